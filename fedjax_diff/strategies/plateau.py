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

The trigger is host-side Python: its whole state is the signal since the
last correction and the number of corrections, both rebuilt on resume by
`replay` from the rows of metrics.jsonl (`signal`, `fired` per round).
"""

from typing import Iterable, Optional


class PlateauTrigger:
  """Fires when the relative improvement of a signal over a window stalls."""

  def __init__(self, window: int, threshold: float, max_corrections: int = 1):
    if window < 1:
      raise ValueError(f'The plateau window must be >= 1 round; got {window} '
                       '(config.fedddpm.plus_window).')
    if max_corrections < 0:
      raise ValueError(f'max_corrections must be >= 0; got {max_corrections} '
                       '(config.fedddpm.plus_max_corrections).')
    self.window = int(window)
    self.threshold = float(threshold)
    self.max_corrections = int(max_corrections)
    self.history: list[float] = []
    self.corrections = 0

  def relative_improvement(self) -> Optional[float]:
    """rel_r of the current history, or None with fewer than 2W values."""
    w = self.window
    if len(self.history) < 2 * w:
      return None
    prev = sum(self.history[-2 * w:-w]) / w
    last = sum(self.history[-w:]) / w
    return (prev - last) / max(abs(prev), 1e-12)

  def observe(self, value: float) -> bool:
    """Adds round r's signal; True when a correction is to be made now."""
    value = float(value)
    if value != value:  # NaN: no information, never a trigger.
      return False
    self.history.append(value)
    if self.corrections >= self.max_corrections:
      return False
    rel = self.relative_improvement()
    if rel is None or rel >= self.threshold:
      return False
    self.corrections += 1
    self.history = []
    return True

  def replay(self, rows: Iterable[dict]) -> None:
    """Rebuilds the state from logged rows with keys `signal` and `fired`
    (as the trainer writes them), in round order."""
    self.history, self.corrections = [], 0
    for row in rows:
      if 'signal' not in row:
        continue
      if row.get('fired'):
        self.corrections += 1
        self.history = []
      else:
        self.history.append(float(row['signal']))
