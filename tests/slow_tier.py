"""Writes tests/slow_tests.txt, the slow tier, from a pytest durations log.

The README's test command (and CI) runs the fast tier: every test except those
listed in tests/slow_tests.txt, which tests/conftest.py skips unless pytest is
given --slow. A test is slow when its setup, call and teardown took
--threshold seconds (10) or more in a full run on the 2-core CPU machine;
the tests of KEEP stay in the fast tier whatever they take (the end-to-end
trainer run and its resume, bf16 mixed precision, the two-process run, the
notebook), and so does the fastest case of each parametrized test when it
takes under 1.5 × the threshold. The threshold went from 20 s to 10 s when
CI's run reached 1,335 s of its 20 minutes: it moves about a third of the
fast tier's test time to the slow tier.

  python -m pytest -q -n 2 tests --slow --durations=0 -p no:cacheprovider \
      > /tmp/durations.txt
  python -m pytest -q -n 2 tests --durations=0 -p no:cacheprovider \
      > /tmp/durations_fast.txt
  python -m pytest -q --co tests --slow > /tmp/collected.txt
  python tests/slow_tier.py /tmp/durations.txt /tmp/durations_fast.txt \
      --collected /tmp/collected.txt

A module-scoped fixture's setup is charged to the first test that uses it,
and its neighbours would pay it in the fast tier: when a test's setup alone
reaches --module_threshold (20 s), its whole module is slow. (Not at the
10 s threshold: a plain-loop test's own compilation is charged to its
setup too, and that rule would then send whole modules of the core
references, FedAvg's among them, out of CI.)
"""

import argparse
import collections
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = os.path.join(HERE, 'slow_tests.txt')
# Always in the fast tier, which CI runs: the end-to-end run and its resume,
# bf16 (issue 12), the two-process kill-and-resume run and the Colab notebook
# in a Jupyter kernel (issue 17). tests/conftest.py hands them out first.
KEEP = ('tests/test_trainer.py::', 'tests/models/test_mixed_precision.py::',
        'tests/test_multihost.py::',
        'tests/test_colab.py::test_quickstart_notebook_runs_in_a_kernel')
_LINE = re.compile(r'([\d.]+)s (call|setup|teardown)\s+(.+?)\s*$')


def slow_tests(logs: list[str], threshold: float,
               module_threshold: float) -> list[tuple[float, str]]:
  """(seconds, node id) of the tests at or over `threshold`, slowest first.

  A test's seconds are the most it took in any of `logs`: a test that reused
  a compilation another test had cached pays for it when that one moves to
  the slow tier, which a log of the fast tier alone shows.
  """
  seconds = collections.Counter()
  slow_modules = set()
  for log in logs:
    in_log = collections.Counter()
    with open(log) as f:
      for line in f:
        m = _LINE.match(line)
        if m:
          t, phase, node = float(m.group(1)), m.group(2), m.group(3)
          in_log[node] += t
          if phase == 'setup' and t >= module_threshold:
            slow_modules.add(node.split('::')[0])
    for node, t in in_log.items():
      seconds[node] = max(seconds[node], t)
  slow = {n: t for n, t in seconds.items()
          if (t >= threshold or n.split('::')[0] in slow_modules)
          and not n.startswith(KEEP)}
  # A parametrized test keeps its fastest case in the fast tier.
  families = collections.defaultdict(list)
  for n, t in seconds.items():
    if '[' in n:
      families[n.split('[')[0]].append((t, n))
  for cases in families.values():
    t, fastest = min(cases)
    if all(n in slow for _, n in cases) and t < 1.5 * threshold:
      del slow[fastest]
  return sorted(((t, n) for n, t in slow.items()), reverse=True)


def read() -> set[str]:
  """The node ids listed in tests/slow_tests.txt."""
  with open(PATH) as f:
    return {line.split('#')[0].strip() for line in f
            if line.strip() and not line.startswith('#')}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('logs', nargs='+', help='outputs of pytest '
                      '--durations=0, one of them with --slow')
  parser.add_argument('--threshold', type=float, default=10.0)
  parser.add_argument('--module_threshold', type=float, default=20.0,
                      help='a setup this long makes its whole module slow')
  parser.add_argument('--collected', help='output of pytest --co -q: node '
                      'ids the logs name but pytest no longer collects '
                      '(renamed or removed tests) are left out')
  args = parser.parse_args()
  slow = slow_tests(args.logs, args.threshold, args.module_threshold)
  if args.collected:
    with open(args.collected) as f:
      collected = {line.strip() for line in f}
    slow = [(t, n) for t, n in slow if n in collected]
  with open(PATH, 'w') as f:
    f.write(f'# The slow tier: tests over {args.threshold:g} s in a full run '
            'on 2 CPU cores\n# (seconds measured then). Written by '
            'tests/slow_tier.py; run them with --slow.\n')
    for t, node in slow:
      f.write(f'{node}  # {t:.0f}\n')
  print(f'{len(slow)} slow tests ({sum(t for t, _ in slow):.0f} s) -> {PATH}')


if __name__ == '__main__':
  main()
