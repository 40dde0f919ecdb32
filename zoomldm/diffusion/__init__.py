"""Schedules and samplers over a denoiser function ``eps_fn(x_t, t) -> eps``.

Layer rule (DESIGN §9): this package sits at the ground beside ``mags``/``config`` and imports no model code.
"""
from .cache import feature_cache_model_fn
from .guidance import cfg_eps_fn, scale_from_w, w_from_scale
from .noise import item_generators, item_seed, randn_items, step_noise_fn
from .samplers import ddim_sample, ddim_sigma, ddim_step, eps_fn_from_x0_fn, plms_sample
from .schedule import (
    FINAL_ALPHA_ONE,
    Schedule,
    gaussian_log_likelihood,
    normal_kl,
    sampling_timesteps,
)

__all__ = [
    "FINAL_ALPHA_ONE", "Schedule", "cfg_eps_fn", "ddim_sample", "ddim_sigma", "ddim_step",
    "eps_fn_from_x0_fn", "feature_cache_model_fn",
    "gaussian_log_likelihood", "item_generators", "item_seed", "normal_kl", "plms_sample", "randn_items",
    "sampling_timesteps", "scale_from_w", "step_noise_fn", "w_from_scale",
]
