"""Teacher noise schedule: abar[t] for integer t in [0, T), and the x_t / eps / x0 / v conversions."""

import math

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def _cosine_betas(T: int, max_beta: float = 0.999) -> list[float]:
    def abar_fn(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return [min(1 - abar_fn((i + 1) / T) / abar_fn(i / T), max_beta) for i in range(T)]


def alphas_cumprod(
    beta_schedule: str, beta_start: float, beta_end: float, T: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """abar[t] = prod_{i<=t} (1 - beta_i), diffusers' recipe for each schedule; shape (T,).

    In float32 this is bit-identical to diffusers' `alphas_cumprod`; float64 evaluates the same recipe exactly.
    """
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=dtype)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=dtype) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = torch.tensor(_cosine_betas(T), dtype=dtype)
    else:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}; allowed: {', '.join(BETA_SCHEDULES)}")
    return torch.cumprod(1.0 - betas, dim=0)


def schedule_from_scheduler_config(config: dict, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, str]:
    """(abar, prediction_type) from a diffusers scheduler config dict (scheduler_config.json)."""
    if config.get("trained_betas") is not None:
        raise ValueError("scheduler config sets trained_betas; only beta_schedule-defined teachers are supported")
    if config.get("rescale_betas_zero_snr", False):
        raise ValueError("scheduler config sets rescale_betas_zero_snr=true; zero-terminal-SNR teachers are "
                         "not supported (alpha at T-1 would be 0 and the DDIM jump divides by it)")
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"scheduler prediction_type {prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}")
    abar = alphas_cumprod(
        config.get("beta_schedule", "linear"),
        config.get("beta_start", 0.0001),
        config.get("beta_end", 0.02),
        config.get("num_train_timesteps", 1000),
        dtype,
    )
    return abar, prediction_type


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """v of shape (B,) -> (B, 1, ..., 1) with ndim dimensions, to broadcast against x."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def abar_at(abar: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """abar[t] for timesteps t (B,), shaped (B, 1, ..., 1) in like's dtype and device."""
    return append_dims(abar.to(like.device)[t.to(like.device)], like.ndim).to(like.dtype)


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """x0_hat = (x_t - sigma_t eps) / alpha_t; abar_t broadcasts against x_t."""
    return (x_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """eps_hat = (x_t - alpha_t x0) / sigma_t."""
    return (x_t - abar_t.sqrt() * x0) / (1 - abar_t).sqrt()


def v_from_eps_x0(eps: torch.Tensor, x0: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """v = alpha_t eps - sigma_t x0 (the v-prediction target)."""
    return abar_t.sqrt() * eps - (1 - abar_t).sqrt() * x0


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """eps = sigma_t x_t + alpha_t v."""
    return (1 - abar_t).sqrt() * x_t + abar_t.sqrt() * v


def to_eps(model_output: torch.Tensor, x_t: torch.Tensor, abar_t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The teacher's raw output (epsilon or v) as an eps-prediction."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return eps_from_v(x_t, model_output, abar_t)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}")
