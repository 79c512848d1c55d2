"""Denoising networks."""

from fedjax_diff.models.unet import count_params
from fedjax_diff.models.unet import init_params
from fedjax_diff.models.unet import make_eps_fn
from fedjax_diff.models.unet import UNet
from fedjax_diff.models.unet import unet_from_config

__all__ = [
    'UNet',
    'count_params',
    'init_params',
    'make_eps_fn',
    'unet_from_config',
]
