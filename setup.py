"""fedjax_diff: federations of diffusion models in one compiled JAX program."""

import setuptools

setuptools.setup(
    name='fedjax_diff',
    version='0.1.0',
    description=('Federated training of diffusion models (FedDM, FedDDPM, '
                 'FedPhD) with clients vectorized and sharded in JAX.'),
    packages=setuptools.find_packages(include=['fedjax_diff', 'fedjax_diff.*']),
    python_requires='>=3.10',
    install_requires=[
        'jax>=0.10.2,<0.11',
        'flax>=0.12.8,<0.13',
        'optax>=0.2.8,<0.3',
        'orbax-checkpoint>=0.12.8,<0.13',
        'tensorflow-datasets>=4.9.10,<5',
        'tensorflow-cpu>=2.21,<2.22',
        'tensorboard>=2.20',  # clu's summary writers; not pulled in by TF 2.21
        'ml-collections>=1.1,<2',
        'clu>=0.0.12,<0.1',
        'numpy>=2.0',
        'scikit-learn>=1.5',
        'mlxtend>=0.23',
        'pillow>=10',
        'matplotlib>=3.8',
        # The privacy accountant of client-level DP (strategies/accountant.py);
        # tested with 0.6.0, whose Requires pin attrs<24.
        'dp-accounting>=0.6,<0.7',
    ],
    extras_require={
        # Reference implementations, for tests only. torch is pinned to the
        # CPU build that lies on this project's machines (no CUDA download).
        'test': [
            'pytest>=8',
            # Two test processes: the suite is mostly single-threaded XLA
            # compilation, so it runs ~2x faster on a 2-core machine.
            'pytest-xdist>=3.5',
            'torch==2.13.0',
            'diffusers>=0.30',
            # pytorch-fid's Inception, the reference of the Flax port
            # (tests/metrics/test_inception.py). torchvision 0.28.0 is the
            # release paired with torch 2.13.0; only its Python code is used.
            'torchvision==0.28.0',
            'pytorch-fid==0.3.0',
        ],
    },
)
