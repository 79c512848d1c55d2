"""Exact communication accounting: bytes on the wire per message.

A message is serialized as the concatenation of its leaves' raw bytes in a
fixed order (both ends know the shapes and dtypes from the model config), so a
float32 tree of P parameters costs exactly 4·P bytes. Strategies that change
what is sent (quantized or masked updates) report their own message sizes
with the same convention (`strategies.upload.UploadTransform.wire_bytes`).

Per round with K participating clients:

    downlink = K · bytes(θ_global)      (float32 parameters to each client),
    uplink   = K · bytes(message(Δ̂_k))  (the upload transform's wire size).

Both are static: they depend on shapes and configs only, never on values.
Padding slots of a round are not clients and send nothing.
"""

from typing import Any, Optional

import jax
import numpy as np

PyTree = Any


def tree_bytes(tree: PyTree) -> int:
  """Bytes of a pytree of arrays (or ShapeDtypeStructs) sent uncompressed."""
  return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


def fedavg_round_bytes(params: PyTree, num_clients: int) -> dict[str, int]:
  """One FedAvg round: θ down to each client, Δ up from each (float32).

  Returns:
    {'downlink_bytes', 'uplink_bytes'} for all `num_clients` clients.
  """
  per_message = tree_bytes(params)
  return {'downlink_bytes': num_clients * per_message,
          'uplink_bytes': num_clients * per_message}


def message_bytes(upload: Optional[Any], params: PyTree) -> int:
  """Exact bytes of one client's upload, from the parameters' shapes/dtypes.

  Args:
    upload: a `strategies.upload.UploadTransform` (its `wire_bytes` is
      called with `tree_bytes` as what follows its last stage); None is
      FedAvg's raw update.
    params: the parameters, or any tree of arrays / ShapeDtypeStructs with
      their shapes and dtypes (e.g. `jax.eval_shape` of the init).
  """
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        params)
  if upload is None:
    return tree_bytes(shapes)
  return int(upload.wire_bytes(shapes, tree_bytes))


def round_bytes(params: PyTree, num_clients: int,
                upload: Optional[Any] = None) -> dict[str, int]:
  """One round: θ down to each client, the upload transform's message up.

  Args:
    params: the global parameters (or their ShapeDtypeStructs).
    num_clients: participating clients (not padding slots).
    upload: a `strategies.upload.UploadTransform`; None is FedAvg's float32
      update.

  Returns:
    {'downlink_bytes', 'uplink_bytes'} for all `num_clients` clients.
  """
  return {'downlink_bytes': num_clients * tree_bytes(params),
          'uplink_bytes': num_clients * message_bytes(upload, params)}


def run_summary(params: PyTree, num_rounds: int, clients_per_round: int,
                upload: Optional[Any] = None,
                per_round: Optional[dict[str, int]] = None) -> dict[str, Any]:
  """Total traffic of a run of `num_rounds` rounds, and its uplink saving.

  `per_round` is one round's {'uplink_bytes', 'downlink_bytes'} (default
  `round_bytes(params, clients_per_round, upload)`; an algorithm that sends
  more, e.g. SCAFFOLD's control variates, gives its own).
  `uplink_compression_vs_fedavg_fp32` is FedAvg's float32 uplink divided by
  this run's (8-bit quantization gives ≈ 4×); `uplink_fraction_of_fedavg_fp32`
  its inverse.
  """
  if per_round is None:
    per_round = round_bytes(params, clients_per_round, upload)
  fedavg = fedavg_round_bytes(params, clients_per_round)
  up = num_rounds * per_round['uplink_bytes']
  down = num_rounds * per_round['downlink_bytes']
  fedavg_up = num_rounds * fedavg['uplink_bytes']
  return {
      'rounds': int(num_rounds),
      'clients_per_round': int(clients_per_round),
      'upload': getattr(upload, 'name', 'fp32'),
      'param_bytes': tree_bytes(params),
      'uplink_bytes_per_client': per_round['uplink_bytes'] // max(
          clients_per_round, 1),
      'downlink_bytes_per_client': per_round['downlink_bytes'] // max(
          clients_per_round, 1),
      'total_uplink_bytes': up,
      'total_downlink_bytes': down,
      'total_bytes': up + down,
      'fedavg_fp32_total_uplink_bytes': fedavg_up,
      'uplink_compression_vs_fedavg_fp32': fedavg_up / up if up else float(
          'inf'),
      'uplink_fraction_of_fedavg_fp32': up / fedavg_up if fedavg_up else 0.0,
  }


def with_exact_totals(summary: dict[str, Any], rounds: list[dict[str, int]],
                      clients: int) -> dict[str, Any]:
  """`run_summary` whose totals are the sums of the given rounds' traffic,
  for cohorts that vary from round to round (Poisson sampling): `clients`
  messages in all, and FedAvg's float32 uplink for the same clients. The
  per-client figures and the compression ratios do not change."""
  out = dict(summary)
  up = int(sum(r['uplink_bytes'] for r in rounds))
  down = int(sum(r['downlink_bytes'] for r in rounds))
  fedavg_up = int(clients) * summary['param_bytes']
  out.update({
      'total_uplink_bytes': up,
      'total_downlink_bytes': down,
      'total_bytes': up + down,
      'fedavg_fp32_total_uplink_bytes': fedavg_up,
      'uplink_compression_vs_fedavg_fp32': fedavg_up / up if up else float(
          'inf'),
      'uplink_fraction_of_fedavg_fp32': up / fedavg_up if fedavg_up else 0.0,
  })
  return out


def format_summary(summary: dict[str, Any]) -> str:
  """A few human-readable lines of `run_summary`."""
  mib = 2.0 ** 20
  ratio = summary['uplink_fraction_of_fedavg_fp32']
  if not ratio:
    vs_fedavg = 'no upload'
  elif ratio == 1:
    vs_fedavg = 'the same as FedAvg in fp32'
  elif ratio < 1:
    vs_fedavg = f'{1 / ratio:.2f}× less than FedAvg in fp32'
  else:  # SCAFFOLD sends Δy and Δc.
    vs_fedavg = f'{ratio:.2f}× FedAvg in fp32'
  return (
      f'Communication over {summary["rounds"]} rounds × '
      f'{summary["clients_per_round"]} clients (upload: {summary["upload"]}):'
      f'\n  uplink   {summary["total_uplink_bytes"] / mib:,.2f} MiB '
      f'({summary["uplink_bytes_per_client"]:,} B per client and round), '
      f'{vs_fedavg}'
      f'\n  downlink {summary["total_downlink_bytes"] / mib:,.2f} MiB '
      f'({summary["downlink_bytes_per_client"]:,} B per client and round)'
      f'\n  total    {summary["total_bytes"] / mib:,.2f} MiB')


def model_upload_bytes(params: PyTree, num_clients: int) -> int:
  """A one-time upload of every client's whole float32 model (FedDDPM's
  phase 1, arXiv 2503.06426): `num_clients · bytes(θ)`."""
  return int(num_clients) * tree_bytes(params)


def with_one_time_upload(summary: dict[str, Any],
                         upload_bytes: int) -> dict[str, Any]:
  """`run_summary` plus a one-time uplink message (e.g. FedDDPM's model
  upload): its bytes go into the run's uplink and total, the compression
  figures are recomputed, and `one_time_uplink_bytes` names them."""
  out = dict(summary)
  up = summary['total_uplink_bytes'] + int(upload_bytes)
  fedavg_up = summary['fedavg_fp32_total_uplink_bytes']
  out.update({
      'one_time_uplink_bytes': int(upload_bytes),
      'total_uplink_bytes': up,
      'total_bytes': up + summary['total_downlink_bytes'],
      'uplink_compression_vs_fedavg_fp32': fedavg_up / up if up else float(
          'inf'),
      'uplink_fraction_of_fedavg_fp32': up / fedavg_up if fedavg_up else 0.0,
  })
  return out


# Hierarchies (FedPhD, arXiv 2507.06449): clients talk to edge servers every
# round (the messages above, on the client↔edge links), and the E edges talk
# to the cloud at cloud rounds only: each edge sends its float32 model up and
# receives the global model back,
#
#     edge→cloud = cloud→edge = E · bytes(θ)   at a cloud round, 0 otherwise.
#
# Flat FedAvg has no edges: its clients' links are the cloud links, so its
# cloud-link bytes are all its bytes.


def edge_cloud_round_bytes(params: PyTree, num_edges: int,
                           cloud: bool) -> dict[str, int]:
  """One round's edge↔cloud traffic: {'edge_cloud_uplink_bytes',
  'edge_cloud_downlink_bytes'}, E·bytes(θ) each at a cloud round."""
  per_link = int(num_edges) * tree_bytes(params) if cloud else 0
  return {'edge_cloud_uplink_bytes': per_link,
          'edge_cloud_downlink_bytes': per_link}


def with_edge_cloud_links(summary: dict[str, Any], params: PyTree,
                          num_edges: int, cloud_rounds: int) -> dict[str, Any]:
  """`run_summary` of the client↔edge links plus the edge↔cloud links.

  Adds `client_edge_bytes` (the clients' traffic, up and down),
  `total_edge_cloud_{uplink,downlink}_bytes`, `cloud_link_bytes` (all bytes
  through the cloud), `total_bytes` (all links), and FedAvg's figures for the
  same rounds and clients in float32 (`fedavg_fp32_cloud_link_bytes`, which
  is also its total, and the fractions of it).
  """
  out = dict(summary)
  edge = int(cloud_rounds) * int(num_edges) * tree_bytes(params)
  client_edge = summary['total_uplink_bytes'] + summary['total_downlink_bytes']
  fedavg = 2 * summary['fedavg_fp32_total_uplink_bytes']
  out.update({
      'num_edges': int(num_edges),
      'cloud_rounds': int(cloud_rounds),
      'client_edge_bytes': client_edge,
      'total_edge_cloud_uplink_bytes': edge,
      'total_edge_cloud_downlink_bytes': edge,
      'cloud_link_bytes': 2 * edge,
      'total_bytes': client_edge + 2 * edge,
      'fedavg_fp32_cloud_link_bytes': fedavg,
      'cloud_link_fraction_of_fedavg_fp32': 2 * edge / fedavg if fedavg
                                            else 0.0,
      'total_fraction_of_fedavg_fp32': (client_edge + 2 * edge) / fedavg
                                       if fedavg else 0.0,
  })
  return out


def format_edge_cloud(summary: dict[str, Any]) -> str:
  """One line on the cloud links of `with_edge_cloud_links`."""
  mib = 2.0 ** 20
  return (f'  cloud links: {summary["num_edges"]} edges × '
          f'{summary["cloud_rounds"]} cloud rounds = '
          f'{summary["cloud_link_bytes"] / mib:,.2f} MiB '
          f'({summary["cloud_link_fraction_of_fedavg_fp32"]:.3f} of flat '
          f'FedAvg\'s {summary["fedavg_fp32_cloud_link_bytes"] / mib:,.2f} '
          f'MiB); all links {summary["total_bytes"] / mib:,.2f} MiB')
