"""Splitting a dataset's examples among federated clients.

Every partitioner is a pure function of the labels and a seed (it draws from
`np.random.default_rng(seed)`), and returns one sorted int64 array of
example indices per client. The arrays are disjoint and together cover all
examples.
"""

import inspect
from typing import Callable

import numpy as np

# Resampling attempts before `dirichlet` gives up on `min_size`.
_MAX_TRIES = 1000


def _check_labels(labels) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f'labels must be 1-D, got shape {labels.shape}.')
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    raise TypeError(f'labels must be integers, got dtype {labels.dtype}.')
  if labels.size and labels.min() < 0:
    raise ValueError('labels must be non-negative.')
  return labels.astype(np.int64, copy=False)


def _check_num_clients(num_clients, num_examples: int, min_size: int = 1):
  if isinstance(num_clients, bool) or not isinstance(
      num_clients, (int, np.integer)) or num_clients < 1:
    raise ValueError(f'num_clients must be a positive int, got '
                     f'{num_clients!r}.')
  if num_clients * min_size > num_examples:
    raise ValueError(f'Cannot give {num_clients} clients at least {min_size} '
                     f'example(s) each from {num_examples} examples.')


def _finish(parts) -> list[np.ndarray]:
  return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _split_by_counts(indices: np.ndarray, counts) -> list[np.ndarray]:
  return np.split(indices, np.cumsum(counts)[:-1])


def _sizes_from_proportions(proportions: np.ndarray, total: int) -> np.ndarray:
  """Integer sizes summing to `total`, by largest remainder."""
  exact = proportions * total
  sizes = np.floor(exact).astype(np.int64)
  short = total - int(sizes.sum())
  if short > 0:
    order = np.argsort(-(exact - sizes), kind='stable')
    sizes[order[:short]] += 1
  return sizes


def iid(labels, num_clients: int, seed: int) -> list[np.ndarray]:
  """Uniformly random, equally sized clients (the IID baseline).

  The IID setting of McMahan et al., 2017, "Communication-Efficient Learning
  of Deep Networks from Decentralized Data" (arXiv 1602.05629): examples are
  shuffled and dealt into `num_clients` parts whose sizes differ by at most
  one.

  Args:
    labels: int array [N]; only its length is used.
    num_clients: number of clients, at most N.
    seed: random seed.

  Returns:
    `num_clients` sorted int64 index arrays.
  """
  labels = _check_labels(labels)
  _check_num_clients(num_clients, labels.size)
  rng = np.random.default_rng(seed)
  return _finish(np.array_split(rng.permutation(labels.size), num_clients))


def dirichlet(labels,
              num_clients: int,
              alpha: float,
              seed: int,
              min_size: int = 1) -> list[np.ndarray]:
  """Label-skewed clients drawn from a Dirichlet distribution.

  Hsu, Qi & Brown, 2019, "Measuring the Effects of Non-Identical Data
  Distribution for Federated Visual Classification" (arXiv 1909.06335)
  model label skew with Dirichlet(alpha) class proportions: small alpha gives
  clients dominated by few classes, large alpha approaches IID. This is the
  per-class form used by Yurochkin et al., 2019 (arXiv 1905.12022) and the
  NIID-Bench of Li et al., 2022 (arXiv 2102.02079): for each class k,
  client proportions p_k ~ Dir_K(alpha) are drawn and the class's shuffled
  examples are cut in those proportions. The whole draw is repeated until
  every client has at least `min_size` examples.

  Args:
    labels: int array [N] of class labels.
    num_clients: number of clients K.
    alpha: Dirichlet concentration, > 0.
    seed: random seed.
    min_size: minimum number of examples per client.

  Returns:
    `num_clients` sorted int64 index arrays, disjoint and covering [0, N).

  Raises:
    ValueError: on bad arguments, or if no draw in 1000 attempts gives every
      client `min_size` examples (raise alpha or lower min_size).
  """
  labels = _check_labels(labels)
  _check_num_clients(num_clients, labels.size, min_size)
  if not alpha > 0:
    raise ValueError(f'alpha must be positive, got {alpha}.')
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  members = [np.flatnonzero(labels == c) for c in classes]
  for _ in range(_MAX_TRIES):
    parts = [[] for _ in range(num_clients)]
    for idx in members:
      idx = rng.permutation(idx)
      proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
      cuts = (np.cumsum(proportions)[:-1] * idx.size).astype(np.int64)
      for client, chunk in enumerate(np.split(idx, cuts)):
        parts[client].append(chunk)
    parts = [np.concatenate(p) for p in parts]
    if min(p.size for p in parts) >= min_size:
      return _finish(parts)
  raise ValueError(
      f'dirichlet: no draw in {_MAX_TRIES} attempts gave all {num_clients} '
      f'clients at least {min_size} examples (alpha={alpha}, '
      f'N={labels.size}); use a larger alpha or a smaller min_size.')


def _group_layout(num_classes: int, num_clients: int,
                  classes_per_client: int) -> list[list[int]]:
  """The classes of each client under the 'grouped' shards layout."""
  if num_classes % classes_per_client:
    raise ValueError(
        f"shards(layout='grouped'): the {num_classes} classes cannot be cut "
        f'into groups of classes_per_client={classes_per_client}; it must '
        f'divide the number of classes.')
  num_groups = num_classes // classes_per_client
  if num_clients % num_groups:
    raise ValueError(
        f"shards(layout='grouped'): num_clients={num_clients} must be a "
        f'multiple of the number of class groups G = {num_classes} // '
        f'{classes_per_client} = {num_groups}.')
  per_group = num_clients // num_groups
  return [[g + j * num_groups for j in range(classes_per_client)]
          for g in range(num_groups) for _ in range(per_group)]


def shards(labels,
           num_clients: int,
           classes_per_client: int,
           seed: int,
           layout: str = 'grouped') -> list[np.ndarray]:
  """Pathological non-IID clients holding a few classes each.

  layout='grouped' generalises the CIFAR-10 layout of FedPhD (Long et al.,
  2025, "FedPhD: Federated Pruning with Hierarchical Learning of Diffusion
  Models", arXiv 2507.06449). With C = max(labels) + 1 classes and
  G = C // classes_per_client groups, group g holds classes
  {g, g + G, g + 2G, ...}; the clients are cut into G consecutive blocks of
  num_clients / G clients, block g holds group g, and each class's (shuffled)
  examples are split evenly among the clients of its block. With 10 classes,
  2 classes per client and 20 clients: clients 0-3 hold {0, 5}, 4-7 {1, 6},
  ..., 16-19 {4, 9}. Every client holds exactly `classes_per_client`
  classes. Requires classes_per_client to divide C, num_clients to be a
  multiple of G, and every class to have at least num_clients / G examples.

  layout='random' is the pathological non-IID split of McMahan et al., 2017,
  "Communication-Efficient Learning of Deep Networks from Decentralized Data"
  (arXiv 1602.05629): examples sorted by label are cut into
  num_clients * classes_per_client shards, and each client is dealt
  `classes_per_client` shards at random. Here shards never straddle two
  classes: each class is cut into a number of shards proportional to its size
  (at least one), which is exactly McMahan et al.'s cut when classes are
  balanced. So each client holds at most `classes_per_client` classes (fewer
  if it draws two shards of one class).

  Args:
    labels: int array [N] of class labels.
    num_clients: number of clients.
    classes_per_client: number of classes (grouped) or shards (random) per
      client.
    seed: random seed.
    layout: 'grouped' or 'random'.

  Returns:
    `num_clients` sorted int64 index arrays, disjoint and covering [0, N).
  """
  labels = _check_labels(labels)
  _check_num_clients(num_clients, labels.size)
  if isinstance(classes_per_client, bool) or not isinstance(
      classes_per_client, (int, np.integer)) or classes_per_client < 1:
    raise ValueError(f'classes_per_client must be a positive int, got '
                     f'{classes_per_client!r}.')
  rng = np.random.default_rng(seed)

  if layout == 'grouped':
    num_classes = int(labels.max()) + 1
    client_classes = _group_layout(num_classes, num_clients,
                                   classes_per_client)
    num_groups = num_classes // classes_per_client
    per_group = num_clients // num_groups
    parts = [[] for _ in range(num_clients)]
    for c in range(num_classes):
      idx = rng.permutation(np.flatnonzero(labels == c))
      if idx.size < per_group:
        raise ValueError(
            f"shards(layout='grouped'): class {c} has {idx.size} examples, "
            f'fewer than the {per_group} clients that must share it.')
      first = (c % num_groups) * per_group
      for j, chunk in enumerate(np.array_split(idx, per_group)):
        assert c in client_classes[first + j]
        parts[first + j].append(chunk)
    return _finish([np.concatenate(p) for p in parts])

  if layout == 'random':
    num_shards = num_clients * classes_per_client
    classes, counts = np.unique(labels, return_counts=True)
    if num_shards < classes.size:
      raise ValueError(
          f"shards(layout='random'): {num_shards} shards "
          f'(num_clients * classes_per_client) cannot hold {classes.size} '
          'classes without mixing classes within a shard.')
    if num_shards > labels.size:
      raise ValueError(f"shards(layout='random'): {num_shards} shards need "
                       f'at least that many examples, got {labels.size}.')
    per_class = _shards_per_class(counts, num_shards)
    shard_list = []
    for c, k in zip(classes, per_class):
      idx = rng.permutation(np.flatnonzero(labels == c))
      shard_list.extend(np.array_split(idx, k))
    order = rng.permutation(num_shards)
    return _finish([
        np.concatenate([shard_list[s] for s in
                        order[i * classes_per_client:
                              (i + 1) * classes_per_client]])
        for i in range(num_clients)
    ])

  raise ValueError(f"Unknown shards layout {layout!r}; expected 'grouped' "
                   "or 'random'.")


def _shards_per_class(counts: np.ndarray, num_shards: int) -> np.ndarray:
  """Shards per class: proportional to size, >= 1, <= size, summing up."""
  exact = counts / counts.sum() * num_shards
  alloc = np.clip(np.floor(exact).astype(np.int64), 1, counts)
  while alloc.sum() > num_shards:
    room = np.where(alloc > 1, alloc - exact, -np.inf)
    alloc[np.argmax(room)] -= 1
  while alloc.sum() < num_shards:
    room = np.where(alloc < counts, exact - alloc, -np.inf)
    alloc[np.argmax(room)] += 1
  return alloc


def quantity_skew(labels,
                  num_clients: int,
                  seed: int,
                  alpha: float = 0.5,
                  min_size: int = 1) -> list[np.ndarray]:
  """IID examples with Dirichlet-distributed client sizes.

  The quantity skew of Li et al., 2022, "Federated Learning on Non-IID Data
  Silos: An Experimental Study" (NIID-Bench, arXiv 2102.02079): client
  proportions q ~ Dir_K(alpha) and client i receives about q_i * N examples
  drawn uniformly at random. To guarantee `min_size` without rejection, each
  client first gets `min_size` examples and the remaining N - K * min_size
  are divided in proportions q (rounded by largest remainder, so the sizes
  sum to N exactly).

  Args:
    labels: int array [N]; only its length is used.
    num_clients: number of clients K.
    seed: random seed.
    alpha: Dirichlet concentration, > 0; smaller is more unequal.
    min_size: minimum number of examples per client.

  Returns:
    `num_clients` sorted int64 index arrays, disjoint and covering [0, N).
  """
  labels = _check_labels(labels)
  _check_num_clients(num_clients, labels.size, min_size)
  if not alpha > 0:
    raise ValueError(f'alpha must be positive, got {alpha}.')
  rng = np.random.default_rng(seed)
  proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
  rest = labels.size - num_clients * min_size
  sizes = min_size + _sizes_from_proportions(proportions, rest)
  return _finish(_split_by_counts(rng.permutation(labels.size), sizes))


PARTITIONERS: dict[str, Callable[..., list[np.ndarray]]] = {
    'iid': iid,
    'dirichlet': dirichlet,
    'shards': shards,
    'quantity_skew': quantity_skew,
}


def make_partition(labels, method: str, num_clients: int, seed: int,
                   **kwargs) -> list[np.ndarray]:
  """Partitions by method name: 'iid', 'dirichlet', 'shards' or 'quantity_skew'.

  Args:
    labels: int array [N] of class labels.
    method: name of a partitioner in `PARTITIONERS`.
    num_clients: number of clients.
    seed: random seed.
    **kwargs: the partitioner's own arguments (e.g. alpha=0.1 for
      'dirichlet', classes_per_client=2 and layout='grouped' for 'shards').

  Returns:
    One sorted int64 index array per client.
  """
  try:
    fn = PARTITIONERS[method]
  except KeyError:
    raise ValueError(f'Unknown partition method {method!r}; valid methods: '
                     f'{", ".join(sorted(PARTITIONERS))}.') from None
  return fn(labels, num_clients=num_clients, seed=seed, **kwargs)


def partition_from_config(cfg) -> tuple[str, dict]:
  """(method, keyword arguments) of `config.partition`: the fields the
  method takes (others are ignored, so `--config.partition.method=dirichlet
  --config.partition.alpha=0.1` works from any config).

  Raises:
    ValueError: no method, or an unknown one (the valid ones are listed).
  """
  method = cfg.get('method') if cfg is not None else None
  fn = PARTITIONERS.get(method) if isinstance(method, str) else None
  if fn is None:
    raise ValueError(f'config.partition.method={method!r}; use one of '
                     f'{sorted(PARTITIONERS)}.')
  accepted = inspect.signature(fn).parameters
  kwargs = {k: v for k, v in cfg.items()
            if k in accepted and k not in ('labels', 'num_clients', 'seed')}
  return method, kwargs
