"""The one interface above the models layer: eps_fn(x_t, t, cond) -> eps_hat, and batch-first conditions.

A condition is a tensor (class labels, text embeddings) or a dict of tensors (SDXL: embeddings, pooled
embeddings, time ids), always batch-first, so two conditions concatenate into one batched forward.
"""

from collections.abc import Callable, Mapping

import torch

from pcm.math import append_dims

Cond = torch.Tensor | Mapping[str, torch.Tensor]
EpsFn = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]


def cat_cond(a: Cond, b: Cond) -> Cond:
    """[a; b] along the batch, for one batched forward over two conditions."""
    if isinstance(a, Mapping):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return torch.cat([a, b])


def where_cond(mask: torch.Tensor, a: Cond, b: Cond) -> Cond:
    """Per sample: a where mask (B,) is true, else b."""
    if isinstance(a, Mapping):
        return {k: where_cond(mask, a[k], b[k]) for k in a}
    return torch.where(append_dims(mask, a.ndim).to(a.device), a, b)
