"""Components resolved by name: algorithms and evaluators."""

import pytest

from fedjax_diff import algorithms
from fedjax_diff import evaluators


def test_algorithm_names():
  assert algorithms.names() == ['fedavg', 'fedddpm', 'fedphd', 'scaffold']


@pytest.mark.parametrize('name', ['fedprox', 'base', '_x', 'a.b', ''])
def test_unknown_algorithm_lists_the_valid_names(name):
  with pytest.raises(ValueError) as e:
    algorithms.build(name, run=None)
  message = str(e.value)
  assert 'config.algorithm' in message
  assert "['fedavg', 'fedddpm', 'fedphd', 'scaffold']" in message


def test_unknown_evaluator_lists_the_valid_names():
  with pytest.raises(ValueError, match=r'config\.evaluators\.fidd') as e:
    evaluators.build_evaluators({'fidd': {}}, ctx=None)
  for name in ('class_coverage', 'denoising_loss', 'fid', 'samples'):
    assert name in str(e.value)
  assert "'base'" not in str(e.value)
