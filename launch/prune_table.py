r"""Parameters and MACs of the pruned UNet for a range of pruning ratios.

FedPhD (arXiv 2507.06449) prunes the DDPM CIFAR-10 UNet by channel groups at
one ratio for every group, with torch-pruning's MetaPruner; its code reports
35.75M params / 6.06 GMACs unpruned and 20.34M / 3.42 GMACs at ratio 0.2.
This prints the same figures for our channel groups
(`models.channel_groups`), a pruning rule (`--rule`, default
'torch_pruning', FedPhD's) and compaction (`models.compact`), from shapes
only (nothing is initialised or run):

  PYTHONPATH=. python launch/prune_table.py
  PYTHONPATH=. python launch/prune_table.py --rule=nearest
  PYTHONPATH=. python launch/prune_table.py --config=configs/mnist_fedavg.py

Counts depend only on the kept counts per group, not on which channels the
importance picks. Widths are listed as stem; levels; inputs of the
upsampling convs (levels 1..); time embedding.
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from fedjax_diff import models
from fedjax_diff.models import channel_groups as cg
from fedjax_diff.models import compact as compact_lib
from fedjax_diff.models import macs as macs_lib

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'A training config; default: the DDPM CIFAR-10 UNet.')
_RATIOS = flags.DEFINE_list('ratios', ['0', '0.1', '0.2', '0.3', '0.4', '0.5'],
                            'Pruning ratios.')
_RULE = flags.DEFINE_enum('rule', 'torch_pruning', list(cg.RULES),
                          'How many channels a group keeps '
                          '(models/channel_groups.py).')
_IMAGE = flags.DEFINE_list('image_shape', ['32', '32', '3'],
                           'H,W,C when no --config is given.')


def table(model: models.UNet, image_shape, ratios,
          rule: str = 'torch_pruning') -> list[dict]:
  """One row per ratio: params, MACs and their fractions of the unpruned."""
  shapes = jax.eval_shape(
      lambda: models.init_params(model, jax.random.key(0), image_shape))
  groups = cg.unet_channel_groups(shapes, model.num_groups)
  base_params = models.count_params(shapes)
  base_macs = macs_lib.unet_macs(model, image_shape, shapes)
  rows = []
  for ratio in ratios:
    counts = cg.kept_counts(groups, ratio, rule)
    channels = {g.name: jnp.arange(g.size) < counts[g.name] for g in groups}
    small = compact_lib.compact_model(model, groups, channels)
    small_shapes = cg.pruned_shapes(shapes, groups, counts)
    n = models.count_params(small_shapes)
    macs = macs_lib.unet_macs(small, image_shape, small_shapes)
    rows.append(dict(ratio=ratio, params=n, macs=macs,
                     params_frac=n / base_params, macs_frac=macs / base_macs,
                     level_widths=small.level_widths,
                     upsample_in_widths=small.upsample_in_widths,
                     stem_width=small.stem_width,
                     temb_width=small.temb_width))
  return rows


def format_table(model: models.UNet, image_shape, rows, rule: str) -> str:
  lines = [f'UNet ch={model.ch} ch_mult={tuple(model.ch_mult)} on '
           f'{"x".join(map(str, image_shape))}, GroupNorm groups '
           f'{model.num_groups}, rule {rule!r}',
           '| ratio | params | GMACs | params kept | MACs kept | widths '
           '(stem; levels; upsampling inputs; temb) |',
           '| --- | --- | --- | --- | --- | --- |']
  for r in rows:
    lines.append(
        f'| {r["ratio"]:.1f} | {r["params"] / 1e6:.3f}M | '
        f'{r["macs"] / 1e9:.3f} | {r["params_frac"]:.1%} | '
        f'{r["macs_frac"]:.1%} | {r["stem_width"]}; '
        f'{",".join(map(str, r["level_widths"]))}; '
        f'{",".join(map(str, r["upsample_in_widths"][1:]))}; '
        f'{r["temb_width"]} |')
  return '\n'.join(lines)


def main(argv):
  del argv
  if _CONFIG.value is not None:
    cfg = _CONFIG.value
    model = models.unet_from_config(cfg.model)
    from fedjax_diff.trainer import load_data  # pylint: disable=g-import-not-at-top
    train, _ = load_data(cfg.data)
    image_shape = tuple(train.images.shape[1:])
  else:
    model = models.UNet()
    image_shape = tuple(int(s) for s in _IMAGE.value)
  rows = table(model, image_shape, [float(r) for r in _RATIOS.value],
               _RULE.value)
  print(format_table(model, image_shape, rows, _RULE.value))


if __name__ == '__main__':
  app.run(main)
