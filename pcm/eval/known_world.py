"""What evaluation knows of a world whose answers are known: an interface, filled in by `pcm.stages`.

A synthetic world (the demo's shapes) can read its attributes back from a generated image or clip (an oracle)
and can have its own FID feature space (a net trained on it). Evaluation calls these three through this interface
and never imports the world; `pcm.stages.evaluate` builds it from `pcm.demo` and passes it in.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pcm.config import Config

Oracle = Callable[[np.ndarray, str], dict[str, float]]  # (image (H, W, 3) or clip (F, H, W, 3) uint8, prompt) -> scores


@dataclass(frozen=True)
class KnownWorld:
    oracle: Oracle  # image (H, W, 3) uint8 against its prompt -> {attribute: match in [0, 1]}
    motion_oracle: Oracle  # clip (F, H, W, 3) uint8 against its motion prompt -> {attribute: match in [0, 1]}
    features: Callable[[Config, bool], Callable]  # (cfg, progress) -> the feature function (references.py)


def require_world(world: KnownWorld | None, what: str) -> KnownWorld:
    """The world, or an error saying that `what` needs one (pcm.stages.evaluate passes the demo's)."""
    if world is None:
        raise ValueError(f"{what} needs a known world's oracle and feature net: run the evaluation through "
                         "pcm.stages.evaluate (`pcm evaluate`), which plugs in the demo's, or pass a KnownWorld")
    return world
