"""Consistency distances and the adversarial hinge losses."""

import torch
import torch.nn.functional as F

LOSS_TYPES = ("huber", "l2")


def _diff(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """pred - target, at least in float32 (mixed-precision outputs), float64 kept as is."""
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    return pred.to(dtype) - target.to(dtype)


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """mean(sqrt((pred - target)^2 + c^2) - c), elementwise then averaged; scalar."""
    return (_diff(pred, target).pow(2) + c * c).sqrt().sub(c).mean()


def l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean((pred - target)^2); scalar."""
    return _diff(pred, target).pow(2).mean()


def consistency_distance(pred: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c: float) -> torch.Tensor:
    """The configured distance d(f, y): 'huber' (pseudo-Huber with c = huber_c) or 'l2'."""
    if loss_type == "huber":
        return pseudo_huber(pred, target, huber_c)
    if loss_type == "l2":
        return l2(pred, target)
    raise ValueError(f"unknown loss type {loss_type!r}; allowed: {', '.join(LOSS_TYPES)}")


def hinge_d_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator: mean(relu(1 - D(real))) + mean(relu(1 + D(fake))); scalar."""
    return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()


def hinge_g_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """Generator: mean(relu(1 - D(fake))); scalar."""
    return F.relu(1 - d_fake).mean()
