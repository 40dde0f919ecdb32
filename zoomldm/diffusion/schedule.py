"""Discrete-time Gaussian diffusion schedules and the closed forms built on them.

Forward process (Ho et al. 2020, "DDPM"): q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)  (DDPM eq. 4), with
ᾱ_t = ∏_{s≤t} (1 − β_s). Index convention: ``t`` runs over 0 … T−1 and ``alphas_cumprod[t]`` is ᾱ after
t + 1 noising steps, as in CompVis LDM, guided-diffusion (ADM) and diffusers.

Notation (<code name> -> <paper symbol>)
- betas[t]                   -> β_t
- alphas_cumprod[t]          -> ᾱ_t  (DDIM writes α_t for this product)
- alphas_cumprod_prev[t]     -> ᾱ_{t−1}, with ᾱ_{−1} = 1
- posterior_variance[t]      -> β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)          (DDPM eq. 7)
- posterior_mean_variance    -> μ̃_t(x_t, x_0), β̃_t                          (DDPM eq. 7)

The ZoomLDM UNet uses ``scaled_linear`` (official ``linear``: β from 0.0015 to 0.0195, linear in √β);
the conditioning diffusion model (CDM) uses ``cosine`` (ADM/DiT ``squaredcos_cap_v2``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch

Spacing = Literal["ldm", "adm"]

# Whether ᾱ "after the last sampling step" is 1 (ADM respacing: alphas_cumprod_prev starts at 1) or ᾱ_0
# (CompVis DDIMSampler/PLMSSampler: alphas_prev[0] = alphas_cumprod[0]; diffusers set_alpha_to_one=False).
FINAL_ALPHA_ONE: dict[str, bool] = {"ldm": False, "adm": True}


def sampling_timesteps(T: int, steps: int, spacing: Spacing = "ldm") -> tuple[int, ...]:
    """The sampler's timesteps, in descending order (what the denoiser receives as ``t``).

    ``"ldm"``: CompVis ``make_ddim_timesteps(ddim_discr_method="uniform")``, used by the official ZoomLDM
      DDIM/PLMS samplers: c = T // steps, timesteps = range(0, T, c) + 1, e.g. 981, 961, …, 1 for T=1000,
      steps=50. The "+1" is CompVis's ("to get the final alpha values right"); after the last step
      ᾱ_prev = ᾱ_0.
      As in CompVis, when T % steps != 0 this yields len(range(0, T, c)) steps (31 for steps=30); we keep
      that so step counts match the official code. Equals diffusers ``DDIMScheduler(timestep_spacing=
      "leading", steps_offset=1, set_alpha_to_one=False)`` whenever steps divides T.
    ``"adm"``: guided-diffusion ``space_timesteps(T, [steps])`` (DiT ``create_diffusion(timestep_respacing=
      "200")``, used by the official CDM sampler): round(i·(T−1)/(steps−1)) accumulated as in ADM, so it
      contains 0 and T−1; after the last step ᾱ_prev = 1.
    """
    if not 1 <= steps <= T:
        raise ValueError(f"sampling_timesteps: steps must be in [1, {T}], got {steps}")
    if spacing == "ldm":
        c = T // steps
        ts = tuple(t + 1 for t in range(0, T, c))[::-1]
        if ts[0] >= T:  # CompVis would index ᾱ_T here (out of range, e.g. steps 3, 9, 37); refuse instead
            ok = [s for s in (5, 10, 20, 25, 50, 100, 200) if s <= T // 2]
            raise ValueError(f"sampling_timesteps: {steps} steps with the 'ldm' spacing reach t={ts[0]} >= T={T} "
                             f"(T // steps = {c} does not tile [0, T)); use e.g. {', '.join(map(str, ok))}")
        return ts
    if spacing == "adm":
        stride = 1.0 if steps <= 1 else (T - 1) / (steps - 1)
        taken, cur = [], 0.0
        for _ in range(steps):  # accumulate like ADM so rounding ties break identically
            taken.append(round(cur))
            cur += stride
        return tuple(sorted(set(taken), reverse=True))
    raise ValueError(f"sampling_timesteps: unknown spacing {spacing!r}; choose 'ldm' or 'adm'")


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor,
              logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, e^log_variance), elementwise, in nats (a proper density, unlike ADM's
    ``continuous_gaussian_log_likelihood``, which drops the −log σ term)."""
    return -0.5 * (math.log(2 * math.pi) + log_variance + (x - mean) ** 2 * torch.exp(-log_variance))


@dataclass(frozen=True, eq=False)
class Schedule:
    """β_t and ᾱ_t (float64, CPU) for t = 0 … T−1, plus the closed forms the samplers and losses use.

    Per-item timesteps ``t`` are LongTensors (N,); coefficients are gathered in float64 and cast to the
    dtype/device of the tensor they multiply.
    """

    betas: torch.Tensor           # (T,) float64
    alphas_cumprod: torch.Tensor  # (T,) float64

    def __post_init__(self):
        if self.betas.ndim != 1 or self.betas.shape != self.alphas_cumprod.shape:
            raise ValueError("Schedule: betas and alphas_cumprod must be 1-D tensors of the same length")
        if not bool(((self.betas > 0) & (self.betas <= 1)).all()):
            raise ValueError("Schedule: betas must lie in (0, 1]")

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_betas(cls, betas) -> "Schedule":
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        return cls(betas=betas, alphas_cumprod=torch.cumprod(1.0 - betas, dim=0))

    @classmethod
    def scaled_linear(cls, beta_start: float = 0.0015, beta_end: float = 0.0195, T: int = 1000) -> "Schedule":
        """LDM "linear" (diffusers "scaled_linear"): β_t = linspace(√β_start, √β_end, T)_t², in float64 as in
        CompVis ``make_beta_schedule``. Official ZoomLDM: 0.0015 → 0.0195, T = 1000."""
        return cls.from_betas(torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2)

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "Schedule":
        """ADM "squaredcos_cap_v2" (Nichol & Dhariwal 2021, eq. 17): ᾱ(τ) = cos²((τ + s)/(1 + s)·π/2),
        β_t = min(1 − ᾱ((t+1)/T) / ᾱ(t/T), max_beta). Used by the official CDM."""
        def f(tau: float) -> float:
            return math.cos((tau + s) / (1 + s) * math.pi / 2) ** 2
        return cls.from_betas([min(1 - f((t + 1) / T) / f(t / T), max_beta) for t in range(T)])

    # ---------------------------------------------------------------- derived tables
    @property
    def T(self) -> int:
        return self.betas.shape[0]

    @cached_property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        return torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod[:-1]])

    @cached_property
    def sqrt_alphas_cumprod(self) -> torch.Tensor:
        return self.alphas_cumprod.sqrt()

    @cached_property
    def sqrt_one_minus_alphas_cumprod(self) -> torch.Tensor:
        return (1 - self.alphas_cumprod).sqrt()

    @cached_property
    def posterior_variance(self) -> torch.Tensor:
        """β̃_t (DDPM eq. 7); zero at t = 0."""
        return self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)

    @cached_property
    def posterior_log_variance_clipped(self) -> torch.Tensor:
        """log β̃_t with β̃_0 replaced by β̃_1 (β̃_0 = 0), as in ADM."""
        pv = self.posterior_variance
        return torch.log(torch.cat([pv[1:2], pv[1:]]))

    def timesteps(self, steps: int | Sequence[int], spacing: Spacing = "ldm") -> tuple[int, ...]:
        """Descending sampler timesteps: ``sampling_timesteps(T, steps, spacing)``, or ``steps`` itself
        when it is an explicit sequence (checked to be strictly descending and in range)."""
        if isinstance(steps, int):
            return sampling_timesteps(self.T, steps, spacing)
        ts = tuple(int(t) for t in steps)
        if not ts or any(a <= b for a, b in zip(ts, ts[1:])) or ts[0] >= self.T or ts[-1] < 0:
            raise ValueError(f"Schedule.timesteps: explicit timesteps must be strictly descending "
                             f"in [0, {self.T})")
        return ts

    def alpha_bar_at(self, t: int, final_alpha_one: bool = False) -> float:
        """ᾱ_t as a Python float; t < 0 means "after the last step": 1 (ADM) or ᾱ_0 (CompVis, default)."""
        if t >= self.T:
            raise ValueError(f"Schedule.alpha_bar_at: t={t} out of range for T={self.T}")
        if t < 0:
            return 1.0 if final_alpha_one else float(self.alphas_cumprod[0])
        return float(self.alphas_cumprod[t])

    # ---------------------------------------------------------------- closed forms (per-item t)
    @staticmethod
    def _extract(table: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """table[t] for a LongTensor t (N,), as (N, 1, …, 1) in x's dtype and device. The float64 table is
        cast before it moves (no float64 on the device, no device-to-host sync on t)."""
        out = table.to(dtype=x.dtype).to(x.device)[t.to(x.device).long()]
        return out.reshape(-1, *([1] * (x.ndim - 1)))  # (N, 1, ..., 1)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε  (DDPM eq. 4, reparameterised)."""
        return (self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x̂_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t  (DDPM eq. 15; DDIM eq. 9)."""
        return ((x_t - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * eps)
                / self._extract(self.sqrt_alphas_cumprod, t, x_t))

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """ε = (x_t − √ᾱ_t x̂_0) / √(1 − ᾱ_t): the inverse of ``predict_x0_from_eps``."""
        return ((x_t - self._extract(self.sqrt_alphas_cumprod, t, x_t) * x0)
                / self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t))

    def posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t I) (DDPM eqs. 6–7):
        μ̃_t = β_t √ᾱ_{t−1} / (1 − ᾱ_t) · x_0 + (1 − ᾱ_{t−1}) √α_t / (1 − ᾱ_t) · x_t.
        Returns (mean, variance, log_variance_clipped), the last two broadcastable to x_t."""
        ab, ab_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        coef_x0 = self._extract(self.betas * ab_prev.sqrt() / (1 - ab), t, x_t)
        coef_xt = self._extract((1 - ab_prev) * (1 - self.betas).sqrt() / (1 - ab), t, x_t)
        mean = coef_x0 * x0 + coef_xt * x_t
        return (mean, self._extract(self.posterior_variance, t, x_t),
                self._extract(self.posterior_log_variance_clipped, t, x_t))

    def learned_range_log_variance(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ADM "learned_range" variance (Nichol & Dhariwal 2021, eq. 15): with v ∈ [−1, 1] from the model,
        log Σ_θ = frac·log β_t + (1 − frac)·log β̃_t, frac = (v + 1)/2 (β̃ clipped at t = 0 as above)."""
        max_log = self._extract(torch.log(self.betas), t, v)
        min_log = self._extract(self.posterior_log_variance_clipped, t, v)
        frac = (v + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def vb_terms(self, model_mean: torch.Tensor, model_log_variance: torch.Tensor, x0: torch.Tensor,
                 x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-item variational-bound term L_t in bits per dimension (Nichol & Dhariwal 2021, eqs. 4–6,
        the VB half of L_hybrid, eq. 16): KL(q(x_{t−1}|x_t,x_0) || p_θ(x_{t−1}|x_t)) for t > 0, and the
        decoder NLL −log p_θ(x_0|x_1) at t = 0. Latents are continuous, so the decoder term is a Gaussian
        density (not ADM's discretised 8-bit likelihood). Returns (N,)."""
        true_mean, _, true_log_var = self.posterior_mean_variance(x0, x_t, t)
        dims = tuple(range(1, x0.ndim))
        kl = normal_kl(true_mean, true_log_var, model_mean, model_log_variance).mean(dim=dims) / math.log(2.0)
        nll = -gaussian_log_likelihood(x0, model_mean, model_log_variance).mean(dim=dims) / math.log(2.0)
        return torch.where(t.to(kl.device) == 0, nll, kl)
