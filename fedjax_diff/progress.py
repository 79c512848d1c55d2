"""Progress output for long runs: rate, elapsed time and ETA on one line."""

import sys
import time
from typing import Optional, TextIO

import jax


def format_seconds(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  if h:
    return f'{h}h{m:02d}m{s:02d}s'
  if m:
    return f'{m}m{s:02d}s'
  return f'{s}s'


class Progress:
  """Prints `[what i/n] ... | rate | elapsed | ETA` lines.

  The rate and ETA count only steps done in this process (a resumed run does
  not pretend its first step took the whole earlier run's time), and exclude
  the first step, which includes compilation.
  """

  def __init__(self, total: int, start: int = 0, what: str = 'round',
               stream: Optional[TextIO] = None, unit: str = 'round'):
    self.total = total
    self.start = start
    self.what = what
    self.unit = unit
    self.stream = stream or sys.stdout
    self._t0 = time.perf_counter()
    self._t_first: Optional[float] = None
    self._n_first = start

  def rate(self, done: int) -> Optional[float]:
    """Steps per second since the first completed step."""
    if self._t_first is None or done <= self._n_first:
      return None
    return (done - self._n_first) / (time.perf_counter() - self._t_first)

  def update(self, done: int, extra: str = '') -> str:
    """Reports that `done` steps (absolute) are complete; returns the line."""
    now = time.perf_counter()
    if self._t_first is None:
      self._t_first, self._n_first = now, done
    elapsed = now - self._t0
    rate = self.rate(done)
    parts = [f'[{self.what} {done}/{self.total}]']
    if extra:
      parts.append(extra)
    if rate:
      parts.append(f'{1 / rate:.2f} s/{self.unit}')
      parts.append(f'elapsed {format_seconds(elapsed)}')
      parts.append(f'ETA {format_seconds((self.total - done) / rate)}')
    else:
      parts.append(f'elapsed {format_seconds(elapsed)} (incl. compilation)')
    line = ' | '.join(parts)
    if jax.process_index() == 0:  # one line per run, not per host.
      print(line, file=self.stream, flush=True)
    return line
