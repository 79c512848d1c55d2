"""Bad input is refused before anything is written, with one clear message.

Every case runs launch/train.py's own flag parsing and main in this process
(`run_train`), as the command line would, and checks the exit code, the
message and that the workdir was not created; two cases also run as real
subprocesses. Every shipped config passes the same check.
"""

import glob
import os
import re
import subprocess
import sys

from absl import flags
import pytest

import launch_scripts
from configs import test as test_config
from fedjax_diff import validation
from fedjax_diff import workdir as workdir_lib

ROOT = launch_scripts.ROOT
TEST = 'configs/test.py'


def run_train(args, capsys):
  """(exit code, stderr) of `python launch/train.py ARGS`, in process."""
  train = launch_scripts.load('train')
  flags.FLAGS.unparse_flags()
  for name in list(flags.FLAGS):   # the last parse's --config.* overrides.
    if name.startswith('config.'):
      delattr(flags.FLAGS, name)
  capsys.readouterr()
  argv = ['train.py', '--jax_cache_dir=', *args]
  saved = sys.argv
  # config_flags defines the --config.* override flags from sys.argv.
  sys.argv = argv
  try:
    train.main(train.parse_flags(argv))
    code = 0
  except SystemExit as e:
    code = e.code
  finally:
    sys.argv = saved
  return code, capsys.readouterr().err


# (id, config file, overrides, regex of the message). Each must exit with 2.
CASES = [
    ('rounds_zero', TEST, ['num_rounds=0'],
     r'config\.num_rounds must be an int >= 1, got 0'),
    ('rounds_negative', TEST, ['num_rounds=-3'],
     r'config\.num_rounds must be an int >= 1, got -3'),
    ('seed_negative', TEST, ['seed=-1'], r'config\.seed must be an int >= 0'),
    ('ema_decay_2', TEST, ['ema_decay=2.0'],
     r'config\.ema_decay must be in \[0, 1\)'),
    ('ema_decay_1', TEST, ['ema_decay=1.0'],
     r'config\.ema_decay must be in \[0, 1\)'),
    ('lr_negative', TEST, ['client_optimizer.learning_rate=-1e-3'],
     r'config\.client_optimizer\.learning_rate must be a finite number in '
     r'\(0, inf\), got -0\.001'),
    ('lr_zero', TEST, ['client_optimizer.learning_rate=0.0'],
     r'client_optimizer\.learning_rate must be a finite number in \(0'),
    ('server_lr_zero', TEST, ['server_optimizer.learning_rate=0.0'],
     r'config\.server_optimizer\.learning_rate must be'),
    ('client_optimizer_name', TEST, ['client_optimizer.name=adamw'],
     r"Unknown client optimizer 'adamw' .*\('adam', 'sgd'\)"),
    ('grad_clip_negative', TEST, ['client_optimizer.grad_clip=-1.0'],
     r'client_optimizer\.grad_clip must be a finite number in \[0'),
    ('warmup_negative', TEST, ['client_optimizer.warmup_steps=-5'],
     r'client_optimizer\.warmup_steps must be an int >= 0'),
    ('clients_per_round_over', TEST, ['federation.clients_per_round=5'],
     r'clients_per_round=5 must be an int in \[1, num_clients=4\]'),
    ('clients_per_round_zero', TEST, ['federation.clients_per_round=0'],
     r'clients_per_round=0 must be an int in \[1'),
    ('local_steps_zero', TEST, ['federation.local_steps=0'],
     r'federation\.local_steps must be an int >= 1'),
    ('batch_zero', TEST, ['federation.batch_size=0'],
     r'federation\.batch_size must be an int >= 1'),
    ('batch_over_clients', TEST, ['federation.batch_size=1000'],
     r"batch_size=1000 is larger than every client's data \(the largest "
     r'client holds 409'),
    ('num_clients_zero', TEST, ['federation.num_clients=0'],
     r'federation\.num_clients must be an int >= 1'),
    ('mode_unknown', TEST, ['federation.mode=pmap'],
     r"Unknown execution mode 'pmap' in config\.federation\.mode"),
    ('chunked_no_size', TEST, ['federation.mode=chunked'],
     r"mode='chunked' needs chunk_size >= 1"),
    ('chunk_not_dividing', TEST,
     ['federation.mode=chunked', 'federation.chunk_size=2'],
     r'chunk_size dividing the 1 client slots per device'),
    ('algorithm_unknown', TEST, ['algorithm=fedprox'],
     r"config\.algorithm='fedprox' names no module .* valid names are "
     r"\['fedavg', 'fedddpm', 'fedphd', 'scaffold'\]"),
    ('fedphd_without_hierarchy', TEST, ['algorithm=fedphd'],
     r"'fedphd' needs a config\.hierarchy block"),
    ('more_edges_than_clients', 'configs/mnist_fedphd.py',
     ['hierarchy.num_edges=20'],
     r'num_edges=20 is more edges than the federation has clients'),
    ('fedddpm_pretrain_zero', 'configs/mnist_fedddpm.py',
     ['fedddpm.pretrain_steps=0'], r'fedddpm\.pretrain_steps must be >= 1'),
    ('pruning_ratio_one', 'configs/mnist_fedphd.py:pruning',
     ['pruning.ratio=1.0'], r'config\.pruning\.ratio must be in \[0, 1\)'),
    ('eval_batch_zero', TEST, ['evaluators.denoising_loss.batch_size=0'],
     r'config\.evaluators\.denoising_loss\.batch_size must be >= 1'),
    ('eval_samples_zero', TEST, ['evaluators.samples.num_samples=0'],
     r'evaluators\.samples\.num_samples must be >= 1'),
    ('eval_method', TEST, ['evaluators.samples.method=ddpn'],
     r"samples\.method='ddpn'; use one of "
     r"\('ddim', 'ddpm', 'dpm_solver\+\+'\)"),
    ('image_size_embedded', TEST, ['data.image_size=16'],
     r"image_size=16, but 'digits' is an embedded dataset whose images are "
     r'8x8'),
    ('dataset_unknown', TEST, ['data.name=nosuchdataset'],
     r"config\.data\.name='nosuchdataset': Unknown dataset"),
    ('partition_unknown', TEST, ['partition.method=zipf'],
     r"config\.partition\.method='zipf'; use one of"),
    ('partition_classes_zero', TEST, ['partition.classes_per_client=0'],
     r'config\.partition: classes_per_client must be a positive int'),
    ('prox_negative', TEST, ['prox_mu=-0.1'],
     r'config\.prox_mu must be a finite number >= 0'),
    ('quantize_bits_1', TEST, ['upload.quantize_bits=1'],
     r'config\.upload: .*bits must be an int in \[2, 16\]'),
    ('error_feedback_alone', TEST, ['upload.error_feedback=True'],
     r'error_feedback=True needs a compressor'),
    ('faults_fraction', TEST, ['faults.nan=1.5'],
     r'config\.faults\.nan .* a number in \[0, 1\], got 1\.5'),
    ('faults_sum', TEST, ['faults.dropout=0.6', 'faults.nan=0.6'],
     r'config\.faults fractions add up to 1\.2 > 1'),
    ('timesteps_zero', TEST, ['diffusion.num_timesteps=0'],
     r'config\.diffusion\.num_timesteps must be an int >= 1'),
    ('schedule_unknown', TEST, ['diffusion.schedule=cosine2'],
     r"config\.diffusion\.schedule: Unknown noise schedule 'cosine2'"),
    ('cond_drop_unconditional', TEST, ['diffusion.cond_drop_prob=0.1'],
     r'cond_drop_prob=0\.1 drops class labels, but the model is '
     r'unconditional'),
    ('min_snr_negative', TEST, ['diffusion.min_snr_gamma=-1.0'],
     r'config\.diffusion\.min_snr_gamma must be a number > 0'),
    ('label_embed_std_unconditional', 'configs/mnist_fedavg.py',
     ['model.label_embed_std=1.0'],
     r'label_embed_std=1\.0 initialises the label table, but the model is '
     r'unconditional'),
    ('groups_not_dividing', TEST, ['model.ch=6'],
     r'config\.model: UNet\.num_groups=4 must divide every channel width'),
    ('model_dropout', TEST, ['model.dropout=1.5'],
     r'config\.model\.dropout must be in \[0, 1\)'),
    ('keep_and_shared_state', TEST,
     ['client_optimizer.keep_state=True', 'client_optimizer.shared_state=True'],
     r'keep_state .* and shared_state .* exclude each other'),
    ('eval_params_unknown', TEST, ['eval_params=best'],
     r"config\.eval_params must be one of \('ema', 'raw'\)"),
    ('dp_clip_negative', 'configs/mnist_dp.py', ['dp.clip_norm=-1.0'],
     r'config\.dp\.clip_norm must be in \(0, inf\), got -1\.0'),
    ('dp_with_fedphd', 'configs/mnist_dp.py', ['algorithm=fedphd'],
     r"config\.dp is not supported with config\.algorithm='fedphd'"),
    ('log_every_zero', TEST, ['log_every=0'],
     r'config\.log_every must be an int >= 1'),
    ('checkpoint_every_negative', TEST, ['checkpoint_every=-1'],
     r'config\.checkpoint_every must be an int >= 0'),
    ('override_typo', TEST, ['federation.num_clent=3'],
     r'--config\.federation\.num_clent names no field of the config '
     r"\('num_clent' does not exist\)\. Did you mean \"num_clients\""),
    ('override_type', TEST, ['num_rounds=abc'],
     r"--config\.num_rounds=abc: invalid literal for int\(\)"),
    ('config_argument', 'configs/mnist_quant.py:3', [],
     r'the config argument is the bit width, one of \(8, 4, 2\)'),
    ('config_missing', 'configs/nope.py', [],
     r"--config: \[Errno 2\] No such file or directory: 'configs/nope\.py'"),
]


@pytest.mark.parametrize('config,overrides,match', [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_writing(config, overrides, match,
                                             tmp_path, capsys):
  workdir = tmp_path / 'run'
  code, err = run_train([f'--config={config}', f'--workdir={workdir}'] +
                        [f'--config.{o}' for o in overrides], capsys)
  assert code == 2, err
  assert err.startswith('train.py: error: ') and 'Traceback' not in err
  assert len([line for line in err.splitlines() if 'error' in line]) == 1
  assert re.search(match, err), err
  assert not workdir.exists()


def test_flag_errors(tmp_path, capsys):
  code, err = run_train([f'--config={TEST}'], capsys)
  assert code == 2 and 'Flag --workdir must have a value' in err
  code, err = run_train([f'--config={TEST}', f'--workdir={tmp_path}/w',
                         'extra'], capsys)
  assert code == 2 and "unexpected arguments ['extra']" in err
  assert not (tmp_path / 'w').exists()
  code, err = run_train([f'--config={TEST}', f'--workdir={tmp_path}/w',
                         '--cpu_devices=0'], capsys)
  assert code == 2 and "--cpu_devices=0: use 'auto' or a positive" in err
  assert not (tmp_path / 'w').exists()


def test_workdir_problems_touch_nothing(tmp_path, capsys):
  afile = tmp_path / 'afile'
  afile.write_text('x')
  code, err = run_train([f'--config={TEST}', f'--workdir={afile}'], capsys)
  assert code == 2 and 'is a file, not a directory' in err
  assert afile.read_text() == 'x'
  # A workdir of another run: refused, naming the fields, nothing changed.
  workdir = tmp_path / 'other'
  workdir.mkdir()
  workdir_lib.check_and_write_config(str(workdir), test_config.get_config())
  before = {p: open(os.path.join(workdir, p)).read()
            for p in workdir_lib.all_files(str(workdir))}
  code, err = run_train([f'--config={TEST}', f'--workdir={workdir}',
                         '--config.seed=3'], capsys)
  assert code == 2 and 'seed: 0 in the workdir, 3 now' in err, err
  assert {p: open(os.path.join(workdir, p)).read()
          for p in workdir_lib.all_files(str(workdir))} == before
  # A torn config.json cannot identify the run.
  (workdir / 'config.json').write_text('{"seed": 0, "num_ro')
  code, err = run_train([f'--config={TEST}', f'--workdir={workdir}'], capsys)
  assert code == 2 and 'config.json is unreadable' in err, err


@pytest.mark.parametrize('args,match', [
    (['--config.num_rounds=0'], 'config.num_rounds must be an int >= 1'),
    (['--config.federation.num_clent=3'], 'names no field of the config'),
])
def test_bad_input_in_a_real_process(args, match, tmp_path):
  workdir = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, 'launch/train.py', f'--config={TEST}',
       f'--workdir={workdir}', '--jax_cache_dir=', *args],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 2, proc.stderr
  assert match in proc.stderr and 'Traceback' not in proc.stderr
  assert not workdir.exists()


def _shipped_configs():
  for path in sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py'))):
    name = os.path.basename(path)[:-3]
    if name == '__init__':
      continue
    module = __import__(f'configs.{name}', fromlist=['get_config'])
    args = {'mnist_quant': ['8', '4', '2'], 'cifar10_quant': ['4', '2'],
            'mnist_fedphd': [None, 'hierarchy', 'pruning', 'fedavg'],
            'mnist_fedddpm': [None, 'fedavg'],
            'cifar10_fedddpm': [None, 'plus', 'fedavg']}.get(name, [None])
    for arg in args:
      yield f'{name}:{arg}' if arg else name, module.get_config(arg)


@pytest.mark.parametrize('name,config', list(_shipped_configs()),
                         ids=lambda x: x if isinstance(x, str) else '')
def test_shipped_configs_pass(name, config):
  del name
  validation.check_config(config, num_devices=8)
