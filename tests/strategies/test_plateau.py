"""FedDDPM+'s trigger on synthetic signals."""

import math

import pytest

from fedjax_diff.strategies.plateau import PlateauTrigger


def run(trigger, values):
  return [r for r, v in enumerate(values, 1) if trigger.observe(v)]


def test_fires_on_a_plateau():
  # Falls 20% a round for 6 rounds, then stays flat.
  values = [1.0 * 0.8 ** r for r in range(6)] + [0.8 ** 5] * 6
  fired = run(PlateauTrigger(window=2, threshold=0.05), values)
  # Round 8: means 0.8^4·(1 + 0.8)/2 → 0.8^5, rel = 1 − 0.8/0.9 = 11% ≥ 5%.
  # Round 9: the last 4 values are flat, rel = 0 < 5%: it fires.
  assert fired == [9]


def test_does_not_fire_on_steady_improvement():
  values = [2.0 * 0.9 ** r for r in range(40)]  # 10% better every round.
  trigger = PlateauTrigger(window=3, threshold=0.05)
  assert run(trigger, values) == []
  # rel = 1 − 0.9³ = 0.271 at every round with a full history.
  assert trigger.relative_improvement() == pytest.approx(1 - 0.9 ** 3)


def test_noisy_plateau_and_one_shot():
  # A flat signal with ±1% alternating noise: fires once, then never again.
  values = [1.0 + 0.01 * (-1) ** r for r in range(30)]
  trigger = PlateauTrigger(window=2, threshold=0.02, max_corrections=1)
  assert run(trigger, values) == [4]
  assert trigger.corrections == 1


def test_history_resets_after_a_correction():
  values = [1.0] * 12
  assert run(PlateauTrigger(window=2, threshold=0.05, max_corrections=3),
             values) == [4, 8, 12]


def test_replay_rebuilds_the_state():
  values = [1.0, 0.9, 0.85, 0.84, 0.84, 0.839, 0.7, 0.6, 0.59, 0.59]
  live = PlateauTrigger(window=2, threshold=0.05, max_corrections=2)
  rows = [{'signal': v, 'fired': live.observe(v)} for v in values[:7]]
  resumed = PlateauTrigger(window=2, threshold=0.05, max_corrections=2)
  resumed.replay(rows)
  assert (resumed.history, resumed.corrections) == (live.history,
                                                    live.corrections)
  assert run(resumed, values[7:]) == run(live, values[7:])


def test_nan_is_ignored_and_bad_window_refused():
  trigger = PlateauTrigger(window=1, threshold=0.1)
  assert not trigger.observe(math.nan)
  assert trigger.history == []
  with pytest.raises(ValueError, match='window'):
    PlateauTrigger(window=0, threshold=0.1)
