"""Teacher noise schedules: abar[t] (variance preserving) or sigma_t (rectified flow) for integer t in [0, T), and
the conversions between a denoiser's output (eps, v, flow velocity, x_0) and the pair (x0_hat, eps_hat)."""

import math
from dataclasses import dataclass

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


# ----------------------------------------------------------------------------------------------------------------
# Any Gaussian path x_t = alpha_t x_0 + sigma_t eps: variance preserving (abar) and rectified flow (alpha = 1 - sigma)

SCHEDULE_KINDS = ("vp", "flow")
# what a denoiser returns: eps, VP's v = alpha eps - sigma x_0, the flow velocity u = eps - x_0, or x_0 itself
PARAMETRIZATIONS = ("epsilon", "v_prediction", "flow", "sample")
# eps is no flow parametrization: at sigma = 1 (alpha = 0) it is x_t itself and says nothing about x_0
_ALLOWED = {"vp": ("epsilon", "v_prediction", "sample"), "flow": ("flow", "sample")}


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma' = shift sigma / (1 + (shift - 1) sigma): SD3's timestep shift (FLUX's with shift = exp(mu))."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def flux_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
               base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """exp(mu), mu linear in the number of latent patches from base_shift to max_shift (FLUX's calculate_shift).

    FLUX's exponential time shift e^mu / (e^mu + 1/sigma - 1) is shift_sigmas with shift = e^mu, so one formula serves.
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return math.exp(image_seq_len * slope + base_shift - slope * base_seq_len)


def flow_sigmas(T: int, shift: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """sigma_t = shift((t + 1) / T) for t = 1..T-1 and sigma_0 = 0 (the clean end); shape (T,).

    t >= 1 are diffusers' FlowMatchEulerDiscreteScheduler training sigmas (bit for bit in float32; its model timestep
    is 1000 sigma_t). Timestep 0 is where every flow path ends, sigma = 0, as diffusers' flow sampler ends; its
    training sigma shift(1/T) is on no solver grid with N <= T/2 (docs/flow-matching.md).
    """
    if shift <= 0:
        raise ValueError(f"flow shift={shift:g} must be > 0 (1: no shift; SD3 uses 3.0)")
    base = torch.arange(1, T + 1, dtype=dtype) / T
    sigmas = shift_sigmas(base, shift)
    sigmas[0] = 0.0
    return sigmas


@dataclass(frozen=True)
class NoiseSchedule:
    """x_t = alpha_t x_0 + sigma_t eps on integer timesteps t in [0, T), and the parametrization denoisers return.

    kind 'vp': table = abar, alpha_t = sqrt(abar[t]), sigma_t = sqrt(1 - abar[t]) (t = 0 is abar[0], never 1);
    kind 'flow': table = sigma_t, alpha_t = 1 - sigma_t (t = 0 is sigma = 0). T = len(table).
    """

    kind: str
    table: torch.Tensor  # (T,) abar ('vp') or sigma ('flow')
    prediction: str = "epsilon"  # what a denoiser callable returns on this schedule (PARAMETRIZATIONS)

    def __post_init__(self):
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown schedule kind {self.kind!r}; allowed: {', '.join(SCHEDULE_KINDS)}")
        if self.prediction not in _ALLOWED[self.kind]:
            raise ValueError(f"prediction {self.prediction!r} on a {self.kind} schedule; allowed: "
                             f"{', '.join(_ALLOWED[self.kind])}")

    def __len__(self) -> int:
        return len(self.table)

    def alpha_sigma(self, t: torch.Tensor | int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) for timesteps t (B,) or one int, shaped (B or 1, 1, ..., 1) in like's dtype and device."""
        t = torch.tensor([t]) if isinstance(t, int) else t
        value = abar_at(self.table, t, like)
        if self.kind == "vp":
            return value.sqrt(), (1 - value).sqrt()
        return 1 - value, value


def vp_schedule(abar: torch.Tensor, prediction: str = "epsilon") -> NoiseSchedule:
    """The variance-preserving schedule of alphas_cumprod abar (T,)."""
    return NoiseSchedule("vp", abar, prediction)


def flow_schedule(T: int = 1000, shift: float = 1.0, prediction: str = "flow",
                  dtype: torch.dtype = torch.float32) -> NoiseSchedule:
    """The rectified-flow schedule alpha = 1 - sigma over flow_sigmas(T, shift)."""
    return NoiseSchedule("flow", flow_sigmas(T, shift, dtype), prediction)


def as_schedule(schedule: "NoiseSchedule | torch.Tensor") -> NoiseSchedule:
    """A NoiseSchedule as is; a bare abar tensor is the VP schedule of an eps-predicting denoiser (older callers)."""
    return schedule if isinstance(schedule, NoiseSchedule) else vp_schedule(schedule)


def x0_eps(x_t: torch.Tensor, out: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor,
           prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) from a denoiser's output, so that x_t = alpha_t x0_hat + sigma_t eps_hat; all (B, ...).

        epsilon       x0_hat = (x_t - sigma_t eps) / alpha_t              (needs alpha_t > 0)
        sample        eps_hat = (x_t - alpha_t x0) / sigma_t              (needs sigma_t > 0)
        v_prediction  eps_hat = sigma_t x_t + alpha_t v, x0_hat = alpha_t x_t - sigma_t v   (VP: alpha^2 + sigma^2 = 1)
        flow          x0_hat = x_t - sigma_t u, eps_hat = x_t + alpha_t u   (rectified flow: alpha + sigma = 1)
    """
    if prediction == "epsilon":
        return (x_t - sigma_t * out) / alpha_t, out
    if prediction == "sample":
        return out, (x_t - alpha_t * out) / sigma_t
    if prediction == "v_prediction":
        return alpha_t * x_t - sigma_t * out, sigma_t * x_t + alpha_t * out
    if prediction == "flow":
        return x_t - sigma_t * out, x_t + alpha_t * out
    raise ValueError(f"unknown prediction {prediction!r}; allowed: {', '.join(PARAMETRIZATIONS)}")


def prediction_of(x0: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor,
                  prediction: str) -> torch.Tensor:
    """What a denoiser of this parametrization returns for the pair (x0, eps): the inverse of x0_eps."""
    if prediction == "epsilon":
        return eps
    if prediction == "sample":
        return x0
    if prediction == "v_prediction":
        return alpha_t * eps - sigma_t * x0
    if prediction == "flow":
        return eps - x0
    raise ValueError(f"unknown prediction {prediction!r}; allowed: {', '.join(PARAMETRIZATIONS)}")


_FLOW_REFUSED = ("invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def noise_schedule_from_scheduler_config(config: dict, image_seq_len: int | None = None,
                                         dtype: torch.dtype = torch.float32) -> NoiseSchedule:
    """The NoiseSchedule of a diffusers scheduler config: a DDPM-family one (VP, its prediction_type) or
    FlowMatchEulerDiscreteScheduler's (rectified flow predicting the velocity, shifted by `shift`, or by
    exp(mu(image_seq_len)) when it uses dynamic shifting as FLUX.1-dev does)."""
    # a saved scheduler_config.json names its class; a live scheduler's config does not, but only flows have a shift
    named_flow = config.get("_class_name", "").startswith("FlowMatch")
    if not (named_flow or ("shift" in config and "beta_start" not in config)):
        abar, prediction_type = schedule_from_scheduler_config(config, dtype)
        return vp_schedule(abar, prediction_type)
    for key in _FLOW_REFUSED:
        if config.get(key):
            raise ValueError(f"flow scheduler config sets {key}={config[key]!r}; supported flow schedules are "
                             "shifted sigmas only (SD3's shift, FLUX's dynamic shift)")
    shift = config.get("shift", 1.0)
    if config.get("use_dynamic_shifting", False):
        if config.get("time_shift_type", "exponential") != "exponential":
            raise ValueError(f"time_shift_type {config['time_shift_type']!r}; allowed: exponential")
        if image_seq_len is None:
            raise ValueError("this flow scheduler shifts with the resolution (use_dynamic_shifting): pass "
                             "image_seq_len, the number of latent patches ((H / 16) * (W / 16) for FLUX)")
        shift = flux_shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                           config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    return flow_schedule(config.get("num_train_timesteps", 1000), shift, "flow", dtype)
