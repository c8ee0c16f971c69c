"""Host syncs per training step on CUDA: synchronizing calls counted by torch's sync debug mode.

A step should make at most one (the finite check and the stop flag travel in one gather; losses are read only
when logged). Counted as the difference between a run of `long` and one of `short` steps, so start-up, the final
checkpoint and the export cancel out. `make gpu-check` (part 3) runs it; on CPU there is nothing to count.
"""

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch


def count_syncs(fn: Callable[[], object]) -> int:
    """The synchronizing CUDA calls fn() makes (torch.cuda.set_sync_debug_mode('warn') turns each into a warning)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def per_step(run_steps: Callable[[int], object], short: int = 2, long: int = 6,
             counter: Callable[[Callable[[], object]], int] = count_syncs) -> float:
    """(syncs of a `long`-step run - those of a `short`-step run) / (long - short)."""
    return (counter(lambda: run_steps(long)) - counter(lambda: run_steps(short))) / (long - short)


def distill_runner(base: dict, work: Path) -> Callable[[int], dict]:
    """run(n): a fresh `pcm distill` of n steps in its own folder, logging and checkpointing only at its end."""
    from accelerate.state import AcceleratorState

    from pcm.config import config_from_dict
    from pcm.data.loader import loader_factory
    from pcm.train.distill import distill

    def run(steps: int) -> dict:
        AcceleratorState._reset_state(reset_partial_state=True)
        train = {**base["train"], "max_steps": steps, "log_every": 10_000, "checkpoint_every": 10_000,
                 "mixed_precision": "bf16", "output_dir": str(work / f"steps-{steps}")}
        cfg = config_from_dict(json.loads(json.dumps({**base, "train": train})))
        return distill(cfg, loader_factory(cfg), progress=False)

    return run
