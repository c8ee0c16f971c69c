"""Keyed randomness: every random draw of a training sample is a function of (seed, step, sample id).

So results do not depend on the number of processes, the per-process batch split or restarts: sample 17 of
step 300 gets the same noise, grid index and guidance whichever rank draws it, and after a resume.

A base module (torch and the standard library only), below both `pcm.train` (the step's noise, grid index and
guidance) and `pcm.data` (a sample's random crop), so preparing data never imports training code.
"""

import hashlib
from dataclasses import dataclass

import torch

# Slots of the per-sample uniform vector; new draws take new slots so old ones never change.
U_GRID, U_W, U_DROP, U_R = 0, 1, 2, 3
NUM_UNIFORMS = 8


def sample_seed(seed: int, step: int, sample_id: int) -> int:
    """A 63-bit seed from the triple (a hash, so neighbouring triples give unrelated streams)."""
    digest = hashlib.blake2b(f"pcm:{seed}:{step}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class Draws:
    u: torch.Tensor  # (B, NUM_UNIFORMS) uniforms in [0, 1): grid index, w, caption dropout, r, ...
    eps: torch.Tensor  # (B, *shape) forward-process noise
    z: torch.Tensor | None  # (B, *shape) re-noising noise (adversarial loss), when asked for


def keyed_draws(
    seed: int, step: int, ids: torch.Tensor, shape: tuple[int, ...], with_z: bool = False
) -> Draws:
    """Per-sample draws in a fixed order (uniforms, eps, z) from a CPU generator keyed by (seed, step, id)."""
    u, eps, z = [], [], []
    for sample_id in ids.tolist():
        gen = torch.Generator().manual_seed(sample_seed(seed, step, sample_id))
        u.append(torch.rand(NUM_UNIFORMS, generator=gen, dtype=torch.float64))
        eps.append(torch.randn(shape, generator=gen))
        if with_z:
            z.append(torch.randn(shape, generator=gen))
    return Draws(torch.stack(u), torch.stack(eps), torch.stack(z) if with_z else None)


def keyed_unit(seed: int, name: str) -> float:
    """A uniform number in [0, 1) that is a function of (seed, name) only (e.g. a sample's random crop)."""
    digest = hashlib.blake2b(f"pcm:{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64
