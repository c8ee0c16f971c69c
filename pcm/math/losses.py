"""Consistency distances and the adversarial hinge losses."""

from collections.abc import Sequence

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


def _per_position(logits: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each head's logits as (B, P_h) in at least float32; a single tensor counts as one head."""
    heads = [logits] if isinstance(logits, torch.Tensor) else list(logits)
    if not heads:
        raise ValueError("hinge loss of no discriminator heads: pass at least one (B, ...) logit tensor")
    return [h.reshape(h.shape[0], -1).to(torch.promote_types(h.dtype, torch.float32)) for h in heads]


def _hinge(logits: torch.Tensor | Sequence[torch.Tensor], sign: float, weight: torch.Tensor | None) -> torch.Tensor:
    """(1/H) sum_h mean_{b,p} w_b relu(1 + sign l_{h,b,p}); scalar."""
    heads = _per_position(logits)
    total = 0.0
    for h in heads:
        # the hinge goes on every position before any averaging: on a mean logit it would switch the gradient off
        # for the whole map once the mean passes the margin, however many positions are still inside it
        hinge = F.relu(1 + sign * h)
        total = total + (hinge if weight is None else weight.reshape(-1, 1).to(hinge) * hinge).mean()
    return total / len(heads)


def hinge_d_loss(d_real: torch.Tensor | Sequence[torch.Tensor], d_fake: torch.Tensor | Sequence[torch.Tensor],
                 weight: torch.Tensor | None = None) -> torch.Tensor:
    """Discriminator hinge, per position and per head, then averaged; scalar.

        L_D = (1/H) sum_h [ mean_{b,p} w_b relu(1 - D_h(real)_{b,p}) + mean_{b,p} w_b relu(1 + D_h(fake)_{b,p}) ]

    d_real, d_fake: per head (B, P_h) logits (any trailing shape is flattened; a tensor is one head);
    weight: (B,) per-sample weights w_b, 1 when None (not renormalised, as the reference's mean(weight * ...)).
    """
    return _hinge(d_real, -1.0, weight) + _hinge(d_fake, 1.0, weight)


def hinge_g_loss(d_fake: torch.Tensor | Sequence[torch.Tensor], weight: torch.Tensor | None = None) -> torch.Tensor:
    """Generator hinge, per position and per head, then averaged; scalar.

        L_G = (1/H) sum_h mean_{b,p} w_b relu(1 - D_h(fake)_{b,p})

    d_fake: per head (B, P_h) logits (a tensor is one head); weight: (B,) per-sample weights, 1 when None.
    """
    return _hinge(d_fake, -1.0, weight)
