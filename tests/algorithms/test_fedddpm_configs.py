"""The FedDDPM configs: variants differ only where they should."""

import json

import pytest

from configs import cifar100_fedddpm
from configs import cifar10_fedavg
from configs import cifar10_fedddpm
from configs import mnist_fedddpm
from configs import mnist_fedddpm_plus
from fedjax_diff import workdir as workdir_lib
from fedjax_diff.algorithms import fedddpm


def _flat(config):
  return workdir_lib._flatten(json.loads(workdir_lib.config_to_json(config)))  # pylint: disable=protected-access


def _changed(base, derived):
  a, b = _flat(base), _flat(derived)
  return {k for k in set(a) | set(b) if a.get(k) != b.get(k)}


def test_plus_changes_only_the_plus_flag():
  assert _changed(mnist_fedddpm.get_config(),
                  mnist_fedddpm_plus.get_config()) == {'fedddpm.plus'}
  assert _changed(cifar10_fedddpm.get_config(),
                  cifar10_fedddpm.get_config('plus')) == {'fedddpm.plus'}


def test_fedavg_baselines_use_the_same_model_and_data():
  mnist = mnist_fedddpm.get_config('fedavg')
  assert mnist.algorithm == 'fedavg'
  assert mnist_fedddpm.get_config().algorithm == 'fedddpm'
  assert _changed(mnist_fedddpm.get_config(), mnist) == {
      'algorithm', 'num_rounds', 'evaluators.denoising_loss.every_rounds'}
  assert _changed(cifar10_fedddpm.get_config(),
                  cifar10_fedddpm.get_config('fedavg')) == {'algorithm'}
  for variant in (None, 'plus'):
    assert cifar10_fedddpm.get_config(variant).algorithm == 'fedddpm'
  # Every FedDDPM config's block parses (no unknown or invalid field).
  for config in (mnist_fedddpm.get_config(), mnist_fedddpm_plus.get_config(),
                 cifar10_fedddpm.get_config('plus'),
                 cifar100_fedddpm.get_config()):
    assert fedddpm.Settings.from_config(config).pretrain_steps >= 1


def test_cifar_configs_are_conditional_fedavg_settings():
  changed = _changed(cifar10_fedavg.get_config(), cifar10_fedddpm.get_config())
  assert {k for k in changed if not k.startswith('fedddpm.')} == {
      'algorithm', 'model.num_classes', 'diffusion.cond_drop_prob',
      'evaluators.samples.guidance_scale'}
  c100 = cifar100_fedddpm.get_config()
  assert (c100.data.name, c100.model.num_classes,
          c100.partition.classes_per_client) == ('cifar100', 100, 10)


def test_unknown_variant_is_refused():
  with pytest.raises(ValueError, match="'plus'"):
    cifar10_fedddpm.get_config('pluss')
  with pytest.raises(ValueError, match="'fedavg'"):
    mnist_fedddpm.get_config('fedprox')
