"""Strategies from a config: the client-side chain and the upload path.

Config fields (defaults and documentation in configs/mnist_fedavg.py; a
config without them is plain FedAvg):

    config.prox_mu            FedDM-prox's μ; > 0 puts `proximal(μ)` first in
                              the client optimizer chain.
    config.group_lasso        λ > 0 adds the sparse-training penalty
                              λ·Σ‖θ_{g,c}‖₂ over UNet channel groups
                              (`pruning.group_lasso`; set by
                              config.pruning.schedule='after_sparse').
    config.frobenius_penalty  λ > 0 adds FedPhD's sparse-training penalty
                              λ·Σ_W ‖W‖_F over weight tensors
                              (`pruning.frobenius_penalty`; set by
                              'after_sparse' with penalty='frobenius').
    config.upload.quantize_bits      0 (off), or 2..16 (FedDM-quant: 8, 4, 2)
    config.upload.granularity        'per_tensor' | 'per_channel'
    config.upload.rounding           'nearest' | 'stochastic'
    config.upload.scale_method       'minmax' | 'mse' | 'calibrated'
    config.upload.error_feedback     bool; needs quantize_bits > 0
    config.upload.calib_batch        'calibrated': images per client
    config.upload.calib_steps        'calibrated': DDIM steps to t ≈ 0.4·T
    config.upload.calib_t_frac       'calibrated': the centre, 0.4
    config.upload.calib_t_spread     'calibrated': its spread, 0.05
    config.dp                 client-level DP (`strategies.privacy`, which
                              parses it): puts `clipping.clip` first in the
                              upload chain, before any quantizer.

Any combination composes: e.g. prox_mu=0.01 with 4-bit quantization and
error feedback trains with the proximal term and uploads EF-quantized
updates.
"""

import dataclasses
from typing import Any, Callable, Optional

import ml_collections

from fedjax_diff.diffusion import NoiseSchedule
from fedjax_diff.strategies import privacy as privacy_lib
from fedjax_diff.strategies import proximal as proximal_lib
from fedjax_diff.strategies import pruning as pruning_lib
from fedjax_diff.strategies import quantize as quantize_lib
from fedjax_diff.strategies import upload as upload_lib
from fedjax_diff.strategies.calibration import Calibration


def client_transforms(config: ml_collections.ConfigDict) -> list[Any]:
  """Transforms put first in the client optimizer chain (raw gradients).

  `[proximal(prox_mu)]` when `config.prox_mu > 0`, then the sparse-training
  penalties whose λ > 0 (`group_lasso`, `frobenius_penalty`); `[]` when
  none is on (so μ = 0 is exactly FedAvg's optimizer).

  Raises:
    ValueError: prox_mu or a penalty's λ is negative or not a number.
  """
  mu = config.get('prox_mu', 0.0)
  try:
    mu = float(mu if mu is not None else 0.0)
  except (TypeError, ValueError):
    raise ValueError(f'config.prox_mu must be a number >= 0, got {mu!r}.'
                     ) from None
  if not 0.0 <= mu < float('inf'):
    raise ValueError(f'config.prox_mu must be a finite number >= 0 '
                     f'(FedDM-prox: 0.01), got {mu!r}.')
  out = [proximal_lib.proximal(mu)] if mu > 0 else []
  lam = config.get('group_lasso', 0.0) or 0.0
  if (isinstance(lam, bool) or not isinstance(lam, (int, float)) or
      not lam >= 0):
    raise ValueError(f'config.group_lasso must be a number >= 0, got '
                     f'{lam!r}.')
  if lam > 0:
    out.append(pruning_lib.group_lasso(
        None, lam, num_groups=int(config.model.get('num_groups', 32))))
  lam = float(config.get('frobenius_penalty', 0.0) or 0.0)
  if lam < 0:
    raise ValueError(f'config.frobenius_penalty must be >= 0, got {lam!r}.')
  if lam > 0:
    out.append(pruning_lib.frobenius_penalty(lam))
  return out


def quantization_config(cfg: Optional[ml_collections.ConfigDict]
                        ) -> Optional[quantize_lib.QuantizationConfig]:
  """The QuantizationConfig of `config.upload`, or None when bits = 0."""
  if cfg is None:
    return None
  bits = cfg.get('quantize_bits', 0) or 0
  if isinstance(bits, bool) or not isinstance(bits, int):
    raise ValueError('config.upload.quantize_bits must be an int: 0 (off) or '
                     f'2..16 bits, got {bits!r}.')
  if bits == 0:
    return None
  try:
    return quantize_lib.QuantizationConfig(
        bits=bits, granularity=cfg.get('granularity', 'per_channel'),
        rounding=cfg.get('rounding', 'stochastic'),
        scale_method=cfg.get('scale_method', 'minmax'))
  except ValueError as e:
    raise ValueError(f'config.upload: {e}') from None


@dataclasses.dataclass(frozen=True)
class UploadSettings:
  """`config.upload`, parsed and checked: the quantizer (None: float32 Δ),
  error feedback, and the calibration fields (for 'calibrated')."""
  quantization: Optional[quantize_lib.QuantizationConfig]
  error_feedback: bool
  calibration: dict


def upload_settings(config: ml_collections.ConfigDict) -> UploadSettings:
  """Parses `config.upload` without building anything.

  Raises:
    ValueError: an invalid or inconsistent `config.upload`.
  """
  cfg = config.get('upload')
  qcfg = quantization_config(cfg)
  error_feedback = (cfg.get('error_feedback', False) if cfg is not None
                    else False)
  if not isinstance(error_feedback, bool):
    raise ValueError('config.upload.error_feedback must be True or False, '
                     f'got {error_feedback!r}.')
  if qcfg is None and error_feedback:
    raise ValueError(
        'config.upload.error_feedback=True needs a compressor: set '
        'config.upload.quantize_bits to 8, 4 or 2.')
  calibration = {}
  if qcfg is not None and qcfg.scale_method == 'calibrated':
    calibration = dict(batch=cfg.get('calib_batch', 4),
                       steps=cfg.get('calib_steps', 4),
                       t_frac=cfg.get('calib_t_frac', 0.4),
                       t_spread=cfg.get('calib_t_spread', 0.05))
    try:  # Calibration's own checks of its fields.
      Calibration(eps_fn=None, schedule=None, image_shape=(1, 1, 1),
                  **calibration)
    except (TypeError, ValueError) as e:
      raise ValueError(f'config.upload (calib_*): {e}') from None
  return UploadSettings(qcfg, error_feedback, calibration)


def upload_from_config(config: ml_collections.ConfigDict, *,
                       eps_fn: Optional[Callable[..., Any]] = None,
                       schedule: Optional[NoiseSchedule] = None,
                       image_shape: Optional[tuple[int, ...]] = None,
                       num_classes: Optional[int] = None
                       ) -> Optional[upload_lib.UploadTransform]:
  """The upload transform of `config.upload` and `config.dp`; None means
  FedAvg's raw Δ.

  The chain is [clip (under config.dp), quantizer], the quantizer wrapped
  in `error_feedback` when asked: clipping comes first, so the quantizer
  encodes the clipped update. With stochastic rounding and scales that clip
  ('mse', 'calibrated'), the quantizer carries the clipped mass to the
  client's next update, so the upload stays unbiased (error feedback's
  residual carries it instead when on). The keyword arguments are needed
  for scale_method='calibrated' only (they describe the model the
  calibration samples from).

  Raises:
    ValueError: an invalid or inconsistent `config.upload` or `config.dp`.
  """
  settings = upload_settings(config)
  dp = privacy_lib.Settings.from_config(config)
  clip = [dp.upload_stage()] if dp is not None else []
  qcfg = settings.quantization
  if qcfg is None:
    return upload_lib.chain(*clip) if clip else None
  calibration = None
  if qcfg.scale_method == 'calibrated':
    if eps_fn is None or schedule is None or image_shape is None:
      raise ValueError(
          "config.upload.scale_method='calibrated' samples calibration "
          'inputs from the model: pass eps_fn, schedule and image_shape.')
    calibration = Calibration(
        eps_fn=eps_fn, schedule=schedule, image_shape=tuple(image_shape),
        num_classes=num_classes, **settings.calibration)
  if settings.error_feedback:
    transform = upload_lib.error_feedback(
        upload_lib.quantizer(qcfg, calibration, carry_clipped=False))
  else:
    transform = upload_lib.quantizer(qcfg, calibration)
  return upload_lib.chain(*clip, transform)
