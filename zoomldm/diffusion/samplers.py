"""DDIM and PLMS samplers as pure functions over a denoiser ``eps_fn(x_t, t) -> eps``.

``t`` is a LongTensor (N,) of training-time indices (0 … T−1) on x_t's device. Samplers take no model
object and keep no state (k-diffusion style); the joint multi-scale, super-resolution and CDM samplers
reuse ``ddim_step``. Nothing is clipped (official ZoomLDM samplers clip neither x̂_0 nor ε).

DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models"), one step τ_i → τ_{i−1} (eq. 12):
    x_prev = √α_prev · x0_hat + √(1 − α_prev − σ²) · ε + σ · z,
    x0_hat = (x_t − √(1 − α_t) · ε) / √α_t                                         ("predicted x_0", eq. 9)
    σ(η)   = η · √((1 − α_prev)/(1 − α_t)) · √(1 − α_t/α_prev)                    (eq. 16)

Notation (<code name> -> <name in paper>)
- alpha_bar_t    -> α_t in DDIM (ᾱ_t in DDPM): ``schedule.alphas_cumprod[t]``
- alpha_bar_prev -> α_{τ_{i−1}}; after the last step ᾱ_0 ("ldm") or 1 ("adm"), see ``schedule.py``
- eps            -> ε_θ^{(t)}(x_t)
- x0_hat         -> f_θ^{(t)}(x_t), "predicted x_0"
- dir_xt         -> "direction pointing to x_t"
- sigma, eta     -> σ_{τ_i}(η), η
- noise          -> z ~ N(0, I), the fresh noise of a stochastic (η > 0) step
- x_prev         -> x_{τ_{i−1}}
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .schedule import FINAL_ALPHA_ONE, Schedule, Spacing

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]          # (x_t, t (N,) long) -> eps
X0Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]           # (x_t, t (N,) long) -> x0_hat
NoiseFn = Callable[[int, torch.Size], torch.Tensor]                   # (step_index, shape) -> z
Callback = Callable[[dict], None]


def eps_fn_from_x0_fn(x0_fn: X0Fn, schedule: Schedule) -> EpsFn:
    """Adapter for x_0-prediction denoisers (the CDM, ADM ``predict_xstart=True``):
    ε = (x_t − √ᾱ_t x̂_0)/√(1 − ᾱ_t), so ``ddim_step`` recovers the model's own x̂_0. ``x0_fn`` must return
    x̂_0 only (for a learned-sigma model, slice off the variance channels first)."""
    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return schedule.predict_eps_from_x0(x_t, t, x0_fn(x_t, t))
    return eps_fn


def ddim_sigma(alpha_bar_t: float, alpha_bar_prev: float, eta: float) -> float:
    """σ(η) of DDIM eq. 16. η = 0: deterministic DDIM; η = 1: the DDPM posterior standard deviation."""
    return eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev))


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int, schedule: Schedule, eta: float = 0.0,
              noise: torch.Tensor | None = None, *, final_alpha_one: bool = False,
              sigma: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update x_t → x_{t_prev} (DDIM eq. 12); returns ``(x_prev, x0_hat)``.

    t, t_prev: integer indices into the schedule, shared by the batch; t_prev < 0 means "to the data"
    (ᾱ_prev = 1 if ``final_alpha_one`` else ᾱ_0, see ``Schedule.alpha_bar_at``).
    sigma: overrides σ(η) (e.g. the official joint sampler's √β̃ variant, official-implementation §5.2).
    noise: z, required when σ > 0.
    """
    alpha_bar_t = schedule.alpha_bar_at(t)
    alpha_bar_prev = schedule.alpha_bar_at(t_prev, final_alpha_one)
    if sigma is None:
        sigma = ddim_sigma(alpha_bar_t, alpha_bar_prev, eta)
    dir_coef_sq = 1.0 - alpha_bar_prev - sigma ** 2
    if dir_coef_sq < -1e-12:
        raise ValueError(f"ddim_step: sigma={sigma:.4g} exceeds sqrt(1 - alpha_bar_prev) at t={t}->{t_prev}")
    x0_hat = (x_t - math.sqrt(1.0 - alpha_bar_t) * eps) / math.sqrt(alpha_bar_t)   # eq. 9
    dir_xt = math.sqrt(max(dir_coef_sq, 0.0)) * eps                                  # eq. 12, 2nd term
    x_prev = math.sqrt(alpha_bar_prev) * x0_hat + dir_xt                              # eq. 12, 1st + 2nd
    if sigma > 0:
        if noise is None:
            raise ValueError("ddim_step: sigma > 0 needs `noise` (pass noise_fn to the sampler)")
        x_prev = x_prev + sigma * noise.to(device=x_prev.device, dtype=x_prev.dtype)  # eq. 12, 3rd term
    return x_prev, x0_hat


def _t_vec(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


@torch.no_grad()
def ddim_sample(eps_fn: EpsFn, x_T: torch.Tensor, schedule: Schedule, steps: int | Sequence[int],
                eta: float = 0.0, noise_fn: NoiseFn | None = None, callback: Callback | None = None,
                progress: bool = False, *, spacing: Spacing = "ldm") -> torch.Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12 with σ from eq. 16) from x_T to x_0.

    steps: number of steps (timesteps from ``sampling_timesteps(T, steps, spacing)``) or an explicit
      descending sequence. spacing "ldm" = official ZoomLDM/CompVis DDIMSampler; "adm" = official CDM
      (``ddim_sample_loop`` with respaced timesteps).
    eta > 0 draws z from ``noise_fn(step_index, x.shape)`` at every step, so per-item seeding holds (see
      ``noise.step_noise_fn``); there is deliberately no global-RNG fallback.
    callback: called after each step with dict(i, t, x (= x_t, before the step), x0_hat, x_prev).
    """
    if eta > 0 and noise_fn is None:
        raise ValueError("ddim_sample: eta > 0 needs noise_fn, e.g. step_noise_fn(seed, indices)")
    ts = schedule.timesteps(steps, spacing)
    final_one = FINAL_ALPHA_ONE[spacing]
    x = x_T
    for i, t in enumerate(tqdm(ts, desc="DDIM", disable=not progress)):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        eps = eps_fn(x, _t_vec(t, x))
        noise = noise_fn(i, x.shape) if eta > 0 else None
        x_prev, x0_hat = ddim_step(x, eps, t, t_prev, schedule, eta, noise, final_alpha_one=final_one)
        if callback is not None:
            callback(dict(i=i, t=t, x=x, x0_hat=x0_hat, x_prev=x_prev))
        x = x_prev
    return x


@torch.no_grad()
def plms_sample(eps_fn: EpsFn, x_T: torch.Tensor, schedule: Schedule, steps: int | Sequence[int],
                callback: Callback | None = None, progress: bool = False, *,
                spacing: Spacing = "ldm") -> torch.Tensor:
    """PLMS sampling as in CompVis ``ldm/models/diffusion/plms.py`` (the official ZoomLDM FID sampler).

    Pseudo linear multi-step (Liu et al. 2022, "PNDM"): the transfer x_t → x_prev is the η = 0 DDIM step
    (PNDM eq. 9 = DDIM eq. 12), applied with an extrapolated ε′ built from the ε history (ε_k = ε at the
    k-th previous sampler timestep):
      step 0: ε′ = (ε(x_t, t) + ε(x̃, t_next))/2, x̃ = DDIM(x_t, ε) (pseudo improved Euler: 2 evaluations)
      step 1: ε′ = (3ε_0 − ε_1)/2
      step 2: ε′ = (23ε_0 − 16ε_1 + 5ε_2)/12
      step ≥3: ε′ = (55ε_0 − 59ε_1 + 37ε_2 − 9ε_3)/24   (Adams–Bashforth orders 2, 3, 4)
    The history stores the raw ε(x_t, t), not ε′ (as CompVis). Total evaluations: len(timesteps) + 1.
    Matches diffusers ``PNDMScheduler(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)``.
    callback: as in ``ddim_sample``.
    """
    ts = schedule.timesteps(steps, spacing)
    final_one = FINAL_ALPHA_ONE[spacing]
    x = x_T
    old_eps: list[torch.Tensor] = []
    for i, t in enumerate(tqdm(ts, desc="PLMS", disable=not progress)):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        eps = eps_fn(x, _t_vec(t, x))
        if not old_eps:
            # CompVis evaluates at the next sampler timestep (t itself when there is only one step).
            x_tilde, _ = ddim_step(x, eps, t, t_prev, schedule, final_alpha_one=final_one)
            eps_next = eps_fn(x_tilde, _t_vec(ts[min(i + 1, len(ts) - 1)], x))
            eps_prime = (eps + eps_next) / 2
        elif len(old_eps) == 1:
            eps_prime = (3 * eps - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x_prev, x0_hat = ddim_step(x, eps_prime, t, t_prev, schedule, final_alpha_one=final_one)
        old_eps = (old_eps + [eps])[-3:]
        if callback is not None:
            callback(dict(i=i, t=t, x=x, x0_hat=x0_hat, x_prev=x_prev))
        x = x_prev
    return x
