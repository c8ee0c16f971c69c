"""Exponential moving average of the trainable (LoRA) parameters, usable as the target net."""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


class EMA:
    """theta_ema <- decay theta_ema + (1 - decay) theta, for a fixed list of parameters."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float):
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - self.decay)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Within the block the live parameters hold the EMA values; restored afterwards, even on error."""
        with torch.no_grad():
            live = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow, strict=True):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, live, strict=True):
                    p.copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        for s, v in zip(self.shadow, state["shadow"], strict=True):
            s.copy_(v)
