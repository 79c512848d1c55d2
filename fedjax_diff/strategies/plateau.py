"""FedDDPM+'s trigger: detect slow learning from a progress signal.

FedDDPM+ (arXiv 2503.06426) does not correct the global model on the
auxiliary data every round; it watches a learning-progress signal and makes a
one-shot correction (a longer server optimization) when learning slows down.
The abstract does not define the signal or the test; ours:

* the signal L_r is the global model's DDPM loss on a held-out slice of the
  auxiliary data after round r (fixed timesteps and noise,
  `server_aux.make_aux_loss`);
* with W = `window`, the mean of the last W values is compared with the mean
  of the W before them (means damp the round-to-round noise of federated
  training):

      rel_r = (mean(L_{r−2W+1..r−W}) − mean(L_{r−W+1..r})) / mean(L_{r−2W+1..r−W})

  and the trigger fires when rel_r < `threshold` (relative improvement too
  small; a rise of the loss gives rel_r < 0 and fires too);
* it needs 2W values since the start or since the last correction (which
  resets the history: the correction changes the model, and the next test
  must see its effect), and fires at most `max_corrections` times
  (1 = one-shot).

The trigger is pure: its whole state (`TriggerState`: the last 2W values,
how many of them are filled, the corrections so far) is a few small arrays
that live in the checkpointed server state, so a resumed run continues it
exactly.
"""

import math
from typing import NamedTuple, Optional

import numpy as np


class TriggerState(NamedTuple):
  """history: float32 [2W], the last values (the newest last); filled:
  int32, how many of them are real (≤ 2W); corrections: int32."""
  history: np.ndarray
  filled: np.ndarray
  corrections: np.ndarray


def init(window: int) -> TriggerState:
  """The state before any signal."""
  if not isinstance(window, int) or window < 1:
    raise ValueError(f'The plateau window must be an int >= 1 round; got '
                     f'{window!r} (config.fedddpm.plus_window).')
  return TriggerState(np.zeros((2 * window,), np.float32),
                      np.zeros((), np.int32), np.zeros((), np.int32))


def relative_improvement(state: TriggerState) -> Optional[float]:
  """rel_r of the current history, or None with fewer than 2W values."""
  hist = np.asarray(state.history, np.float64)
  w = hist.shape[0] // 2
  if int(state.filled) < 2 * w:
    return None
  prev, last = hist[:w].mean(), hist[w:].mean()
  return float((prev - last) / max(abs(prev), 1e-12))


def observe(state: TriggerState, value: float, threshold: float,
            max_corrections: int = 1) -> tuple[TriggerState, bool]:
  """Adds round r's signal; returns the new state and whether a correction
  is to be made now. A NaN signal carries no information and is ignored."""
  if max_corrections < 0:
    raise ValueError(f'max_corrections must be >= 0; got {max_corrections} '
                     '(config.fedddpm.plus_max_corrections).')
  value = float(value)
  if math.isnan(value):
    return state, False
  hist = np.asarray(state.history, np.float32)
  hist = np.concatenate([hist[1:], np.float32([value])])
  filled = min(int(state.filled) + 1, hist.shape[0])
  corrections = int(state.corrections)
  new = TriggerState(hist, np.int32(filled), np.int32(corrections))
  if corrections >= max_corrections:
    return new, False
  rel = relative_improvement(new)
  if rel is None or rel >= threshold:
    return new, False
  return TriggerState(np.zeros_like(hist), np.int32(0),
                      np.int32(corrections + 1)), True
