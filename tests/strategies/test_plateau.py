"""FedDDPM+'s trigger on synthetic signals."""

import math

import numpy as np
import pytest

from fedjax_diff.strategies import plateau


def run(values, window, threshold, max_corrections=1, state=None):
  """Observes `values` in order (rounds 1, 2, ...); returns (the rounds at
  which the trigger fired, the final state)."""
  state = plateau.init(window) if state is None else state
  fired = []
  for r, v in enumerate(values, 1):
    state, now = plateau.observe(state, v, threshold, max_corrections)
    if now:
      fired.append(r)
  return fired, state


def assert_states_equal(a, b):
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_fires_on_a_plateau():
  # Falls 20% a round for 6 rounds, then stays flat.
  values = [1.0 * 0.8 ** r for r in range(6)] + [0.8 ** 5] * 6
  fired, _ = run(values, window=2, threshold=0.05)
  # Round 8: means 0.8^4·(1 + 0.8)/2 → 0.8^5, rel = 1 − 0.8/0.9 = 11% ≥ 5%.
  # Round 9: the last 4 values are flat, rel = 0 < 5%: it fires.
  assert fired == [9]


def test_does_not_fire_on_steady_improvement():
  values = [2.0 * 0.9 ** r for r in range(40)]  # 10% better every round.
  fired, state = run(values, window=3, threshold=0.05)
  assert fired == []
  # rel = 1 − 0.9³ = 0.271 at every round with a full history.
  assert plateau.relative_improvement(state) == pytest.approx(1 - 0.9 ** 3)


def test_noisy_plateau_and_one_shot():
  # A flat signal with ±1% alternating noise: fires once, then never again.
  values = [1.0 + 0.01 * (-1) ** r for r in range(30)]
  fired, state = run(values, window=2, threshold=0.02, max_corrections=1)
  assert fired == [4]
  assert int(state.corrections) == 1


def test_history_resets_after_a_correction():
  fired, _ = run([1.0] * 12, window=2, threshold=0.05, max_corrections=3)
  assert fired == [4, 8, 12]


def test_state_passed_across_a_restore_continues_exactly():
  """What a checkpoint restore does: the sequence observed in two halves,
  the state carried across (as plain arrays, the way it is checkpointed),
  equals it observed in one go: same firings, same final state."""
  values = [1.0, 0.9, 0.85, 0.84, 0.84, 0.839, 0.7, 0.6, 0.59, 0.59]
  live_fired, live = run(values, window=2, threshold=0.05, max_corrections=2)
  assert live_fired  # Not a no-op: the trigger fires on this sequence.
  for cut in range(len(values) + 1):
    first, half = run(values[:cut], window=2, threshold=0.05,
                      max_corrections=2)
    restored = plateau.TriggerState(*[np.array(x) for x in half])
    second, resumed = run(values[cut:], window=2, threshold=0.05,
                          max_corrections=2, state=restored)
    assert first + [r + cut for r in second] == live_fired
    assert_states_equal(resumed, live)


def test_nan_is_ignored_and_bad_window_refused():
  state = plateau.init(1)
  new, fired = plateau.observe(state, math.nan, 0.1)
  assert not fired
  assert int(new.filled) == 0
  assert_states_equal(new, state)
  with pytest.raises(ValueError, match='window'):
    plateau.init(0)
  with pytest.raises(ValueError, match='max_corrections'):
    plateau.observe(state, 1.0, 0.1, max_corrections=-1)
