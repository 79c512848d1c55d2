"""fedjax_diff: federations of diffusion models in one compiled JAX program.

Supported: Python 3.11 with jax 0.10.2 (the last jax for 3.11; the tested
minimum) and Python >= 3.12 with jax 0.11 and 0.12 (CI tests 0.12.x). The
ranges below resolve with both (flax 0.12.9 and later need Python 3.12 and
jax 0.11.1, so pip takes flax 0.12.8 on 3.11). See README, "Install".
"""

import setuptools

JAX = 'jax>=0.10.2,<0.13'

setuptools.setup(
    name='fedjax_diff',
    version='0.1.0',
    description=('Federated training of diffusion models (FedDM, FedDDPM, '
                 'FedPhD) with clients vectorized and sharded in JAX.'),
    packages=setuptools.find_packages(include=['fedjax_diff', 'fedjax_diff.*']),
    python_requires='>=3.11',
    install_requires=[
        JAX,
        'flax>=0.12.8,<0.13',
        'optax>=0.2.8,<0.3',
        'orbax-checkpoint>=0.12.8,<0.13',
        # Workdirs through epath: local folders and gs:// alike.
        'etils[epath]>=1.7',
        'tensorflow-datasets>=4.9.10,<5',
        # Data and summaries only (kept off accelerators by launch/train.py).
        # A runtime that ships the full `tensorflow` (Colab) keeps it: see
        # fedjax_diff/runtime.py and colab/quickstart.ipynb.
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
        # Accelerators: jax's own extras, which add the CUDA 12 plugin and
        # its NVIDIA libraries, or libtpu, matched to the jax version.
        'cuda12': [f'jax[cuda12]{JAX[3:]}'],
        'tpu': [f'jax[tpu]{JAX[3:]}'],
        # Tests. The torch references (diffusers' schedulers, pytorch-fid's
        # Inception, launch/bench.py's PyTorch peer) are pinned to the CPU
        # build of torch 2.13.0, whose wheel lies on this project's machines
        # for Python 3.11 only; on 3.12 pip would fetch torch's CUDA build
        # (GBs), so there they are left out and the tests that compare with
        # them are skipped with that reason (tests/conftest.py).
        'test': [
            'pytest>=8',
            # Two test processes: the suite is mostly single-threaded XLA
            # compilation, so it runs ~2x faster on a 2-core machine.
            'pytest-xdist>=3.5',
            # colab/quickstart.ipynb, executed by a real Jupyter kernel.
            'nbclient>=0.10',
            'nbformat>=5.9',
            'ipykernel>=6.29',
            'torch==2.13.0; python_version < "3.12"',
            'diffusers>=0.30; python_version < "3.12"',
            # pytorch-fid's Inception, the reference of the Flax port
            # (tests/metrics/test_inception.py). torchvision 0.28.0 is the
            # release paired with torch 2.13.0; only its Python code is used.
            'torchvision==0.28.0; python_version < "3.12"',
            'pytorch-fid==0.3.0; python_version < "3.12"',
        ],
    },
)
