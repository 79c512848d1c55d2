"""The FedDM-prox / FedDM-quant configs, and workdirs from before them."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import celeba_fedavg
from configs import celeba_prox
from configs import cifar10_fedavg
from configs import cifar10_quant
from configs import mnist_dp
from configs import mnist_fedavg
from configs import mnist_prox
from configs import mnist_quant
from configs import test as test_config
from fedjax_diff import workdir as workdir_lib
from fedjax_diff.state import init_server_state


def _flat(config):
  return workdir_lib._flatten(json.loads(workdir_lib.config_to_json(config)))  # pylint: disable=protected-access


def _fresh_adam(config):
  """The FedAvg baseline of the paper configs: a fresh client Adam a round."""
  config.client_optimizer.keep_state = False
  return config


def _changed(base, derived):
  a, b = _flat(base), _flat(derived)
  return {k for k in set(a) | set(b) if a.get(k) != b.get(k)}


@pytest.mark.parametrize('derived,base,changes', [
    (mnist_prox.get_config(), _fresh_adam(mnist_fedavg.get_config()),
     {'prox_mu'}),
    (celeba_prox.get_config(), celeba_fedavg.get_config(), {'prox_mu'}),
    (mnist_quant.get_config('8'), _fresh_adam(mnist_fedavg.get_config()),
     {'upload.quantize_bits'}),
    (mnist_quant.get_config('4'), _fresh_adam(mnist_fedavg.get_config()),
     {'upload.quantize_bits'}),
    (mnist_quant.get_config('2'), _fresh_adam(mnist_fedavg.get_config()),
     {'upload.quantize_bits'}),
    (cifar10_quant.get_config('4'), cifar10_fedavg.get_config(),
     {'upload.quantize_bits'}),
])
def test_strategy_configs_change_only_the_strategy(derived, base, changes):
  """Same seed, budget, partition and model as the FedAvg baseline."""
  assert _changed(base, derived) == changes


def test_quant_config_argument():
  assert mnist_quant.get_config().upload.quantize_bits == 8
  assert mnist_quant.get_config('4').upload.quantize_bits == 4
  assert cifar10_quant.get_config('2').upload.quantize_bits == 2
  assert mnist_prox.get_config().prox_mu == 0.01
  for bad in ('3', 'four', '16'):
    with pytest.raises(ValueError, match='bit width'):
      mnist_quant.get_config(bad)


def test_every_config_has_the_strategy_fields():
  """`--config.upload.quantize_bits=4` works from any config."""
  for module in (mnist_fedavg, celeba_fedavg, cifar10_fedavg, test_config):
    config = module.get_config()
    config.upload.quantize_bits = 4
    config.prox_mu = 0.01
    assert config.upload.granularity == 'per_channel'


def test_workdir_from_before_a_field_is_refused_naming_it(tmp_path):
  """An old config.json without a field added since (here `algorithm` and
  `prox_mu`) is refused with the fields named and what to do; once the run's
  value is written into it, the same config resumes. Nothing is assumed."""
  old = json.loads(workdir_lib.config_to_json(test_config.get_config()))
  del old['algorithm']
  del old['prox_mu']
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(old, f)
  with pytest.raises(ValueError) as e:
    workdir_lib.check_and_write_config(str(tmp_path),
                                       test_config.get_config())
  message = str(e.value)
  assert "algorithm: (absent) in the workdir, 'fedavg' now" in message
  assert 'prox_mu: (absent) in the workdir, 0.0 now' in message
  assert 'has no algorithm, prox_mu' in message
  with open(tmp_path / 'config.json') as f:
    assert 'algorithm' not in json.load(f)  # nothing was touched.
  old.update(algorithm='fedavg', prox_mu=0.0)
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(old, f)
  workdir_lib.check_and_write_config(str(tmp_path), test_config.get_config())
  config = test_config.get_config()
  config.upload.quantize_bits = 4
  with pytest.raises(ValueError,
                     match=r'upload\.quantize_bits: 0 in the workdir, 4 now'):
    workdir_lib.check_and_write_config(str(tmp_path), config)


def test_evaluators_may_change_on_resume(tmp_path):
  """Evaluators measure the state and never change it: a run resumes with
  more, fewer or differently configured evaluators, but not with another
  learning rate."""
  config = test_config.get_config()
  workdir_lib.check_and_write_config(str(tmp_path), config)
  config = test_config.get_config()
  config.evaluators = {'denoising_loss': {'every_rounds': 3}}
  workdir_lib.check_and_write_config(str(tmp_path), config)
  config.client_optimizer.learning_rate *= 2
  with pytest.raises(ValueError, match=r'client_optimizer\.learning_rate'):
    workdir_lib.check_and_write_config(str(tmp_path), config)


def test_checkpoint_from_before_client_states(tmp_path):
  """A checkpoint written before ServerState.client_states existed restores
  into a state that keeps no client state."""
  params = {'w': jnp.arange(6.0).reshape(2, 3), 'b': jnp.ones(3)}
  state = init_server_state(params, optax.sgd(1.0, momentum=0.9),
                            jax.random.PRNGKey(0))
  old = {k: getattr(state, k)
         for k in ('params', 'ema_params', 'opt_state', 'round', 'rng')}
  manager = workdir_lib.checkpoint_manager(str(tmp_path))
  workdir_lib.save_checkpoint(manager, 3, old)
  like = init_server_state(jax.tree.map(jnp.zeros_like, params),
                           optax.sgd(1.0, momentum=0.9),
                           jax.random.PRNGKey(1))
  restored, step = workdir_lib.restore_checkpoint(manager, like)
  manager.close()
  assert step == 3 and restored.client_states == {}
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)


def test_dp_configs_differ_only_in_the_dp_block():
  """ε = 10, ε = 1 and no DP train the same federation, model and budget."""
  base = mnist_dp.get_config()
  assert _changed(base, mnist_dp.get_config('1')) == {'dp.target_epsilon'}
  assert _changed(base, mnist_dp.get_config('none')) == {
      'dp.enabled', 'dp.target_epsilon'}
  assert mnist_dp.get_config('') == base
  fed = base.federation
  # 500 clients of 9 images, local batches no larger than a client's data.
  assert (fed.num_clients, fed.clients_per_round) == (500, 50)
  assert fed.batch_size <= 4500 // fed.num_clients
  with pytest.raises(ValueError, match="use '10', '1' or 'none'"):
    mnist_dp.get_config('5')


def test_quickstart_departs_from_fedavg_only_where_its_docstring_says():
  """configs/mnist_quickstart.py is mnist_fedavg.py's federation (data,
  partition, clients, batch, model widths, optimizers, seed) with the
  departures its docstring lists, and nothing else."""
  from configs import mnist_quickstart  # pylint: disable=g-import-not-at-top
  quick = mnist_quickstart.get_config()
  changed = _changed(mnist_fedavg.get_config(), quick)
  departures = {
      'num_rounds', 'federation.local_steps', 'federation.mode',
      'model.num_classes', 'model.label_embed_std',
      'diffusion.cond_drop_prob', 'diffusion.min_snr_gamma',
      'client_optimizer.name', 'client_optimizer.learning_rate',
      'client_optimizer.warmup_steps', 'client_optimizer.keep_state',
      'server_optimizer.name', 'server_optimizer.learning_rate',
      'server_optimizer.momentum', 'server_optimizer.b1',
      'server_optimizer.b2', 'server_optimizer.eps', 'eval_params',
      'checkpoint_every'}
  assert departures <= changed
  assert quick.server_optimizer.name == 'adam'
  assert quick.eval_params == 'raw'
  assert {k for k in changed - departures
          if not k.startswith('evaluators.')} == set()
  # Every sampling evaluator uses the same sampler, run at the last round
  # (also when --config.num_rounds changes it).
  quick.num_rounds = 7
  for name in ('samples', 'fid', 'precision_recall', 'class_coverage'):
    entry = quick.evaluators[name]
    assert entry.method == 'dpm_solver++' and entry.num_steps == 10, name
    assert entry.every_rounds == 7, name
  with pytest.raises(ValueError, match='takes no argument'):
    mnist_quickstart.get_config('conditional')
