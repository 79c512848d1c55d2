"""The diffusion core: noise schedules, training loss, samplers and EMA."""

from fedjax_diff.diffusion.ema import ema_update
from fedjax_diff.diffusion.losses import diffusion_loss
from fedjax_diff.diffusion.losses import drop_labels
from fedjax_diff.diffusion.losses import EpsFn
from fedjax_diff.diffusion.samplers import ddim_step
from fedjax_diff.diffusion.samplers import ddim_timesteps
from fedjax_diff.diffusion.samplers import ddpm_step
from fedjax_diff.diffusion.samplers import dpm_solver_step
from fedjax_diff.diffusion.samplers import dpm_solver_timesteps
from fedjax_diff.diffusion.samplers import guided_eps
from fedjax_diff.diffusion.samplers import sample
from fedjax_diff.diffusion.schedules import cosine_schedule
from fedjax_diff.diffusion.schedules import extract
from fedjax_diff.diffusion.schedules import linear_schedule
from fedjax_diff.diffusion.schedules import make_schedule
from fedjax_diff.diffusion.schedules import NoiseSchedule
from fedjax_diff.diffusion.schedules import q_sample
from fedjax_diff.diffusion.schedules import schedule_from_betas
from fedjax_diff.diffusion.schedules import schedule_from_config

__all__ = [
    'EpsFn',
    'NoiseSchedule',
    'cosine_schedule',
    'ddim_step',
    'ddim_timesteps',
    'ddpm_step',
    'diffusion_loss',
    'dpm_solver_step',
    'dpm_solver_timesteps',
    'drop_labels',
    'ema_update',
    'extract',
    'guided_eps',
    'linear_schedule',
    'make_schedule',
    'q_sample',
    'sample',
    'schedule_from_betas',
    'schedule_from_config',
]
