"""A small MLP student for the analytic teacher: the teacher's eps plus a learned, zero-initialized correction.

Starting exactly at the teacher mirrors LoRA distillation of an SD UNet (adapter B = 0 at init).
"""

import math
from collections.abc import Callable

import torch
from torch import nn

from pcm.models.gmm import UNCOND


def time_features(t: torch.Tensor, T: int, num: int = 16) -> torch.Tensor:
    """Sinusoidal features of t / T at num/2 octave frequencies; (B,) -> (B, num)."""
    freqs = 2.0 ** torch.arange(num // 2, device=t.device, dtype=torch.float32) * math.pi
    phase = (t.float() / T)[:, None] * freqs
    return torch.cat([phase.sin(), phase.cos()], dim=1)


class ResidualMLPStudent(nn.Module):
    """eps_hat(x_t, t, label) = teacher(x_t, t, label) + MLP([x_t, time features, label one-hot])."""

    def __init__(self, teacher: Callable, dim: int, num_classes: int, T: int, hidden: int = 128):
        super().__init__()
        self.teacher = teacher
        self.num_classes, self.T = num_classes, T
        self.net = nn.Sequential(
            nn.Linear(dim + 16 + num_classes + 1, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, dim),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        index = torch.where(label == UNCOND, torch.full_like(label, self.num_classes), label)
        onehot = nn.functional.one_hot(index, self.num_classes + 1).float()
        h = torch.cat([x_t.float(), time_features(t, self.T), onehot], dim=1)
        with torch.no_grad():
            base = self.teacher(x_t, t, label)
        return base + self.net(h).to(x_t.dtype)
