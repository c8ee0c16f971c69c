"""How long an SDXL-size training checkpoint takes to write, fsync and verify on this machine's disk.

The LoRA is the reference one (rank 64 on the reference target modules of SDXL's UNet, fp32), its shapes read off
the UNet built on the meta device (no weights allocated, nothing downloaded); the optimizer is AdamW after one step,
so the checkpoint holds the LoRA and both Adam moments, as `pcm distill` writes them. Reported: bytes, seconds to
save (files, sha256 marker, fsync, rename), seconds to verify and load, and the write rate. This is the figure
that pipeline.termination_grace_seconds must cover after a SIGTERM (plus the step in flight).

    python benchmarks/checkpoint_write.py [--rank 64] [--dir /path/on/the/pvc] [--tiny]
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from pcm.config import LORA_TARGETS
from pcm.models.lora import attach_lora
from pcm.train.checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from sdxl_gpu import SDXL_UNET, TINY_UNET  # noqa: E402


def lora_shapes(config: dict, rank: int) -> dict[str, torch.Size]:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
        attach_lora(unet, rank, 8, LORA_TARGETS)
    return {n: p.shape for n, p in unet.named_parameters() if "lora_" in n}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--dir", default="", help="where to write (default: a temp folder); e.g. a mounted PVC")
    parser.add_argument("--tiny", action="store_true", help="a tiny UNet (a smoke run)")
    parser.add_argument("--json", default="", help="also write the result here")
    args = parser.parse_args(argv)
    shapes = lora_shapes(TINY_UNET if args.tiny else SDXL_UNET, args.rank)
    torch.manual_seed(0)
    lora = {n: torch.randn(s) * 0.01 for n, s in shapes.items()}
    params = [torch.nn.Parameter(t) for t in lora.values()]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()  # fills exp_avg and exp_avg_sq: the checkpoint is three times the LoRA
    root = Path(tempfile.mkdtemp(prefix="pcm-ckpt-", dir=args.dir or None))
    try:
        start = time.perf_counter()
        path = save_checkpoint(root / "checkpoints", 1, lora, optimizer, {"position": [0, 0]}, keep=2)
        saved = time.perf_counter() - start
        start = time.perf_counter()
        problem = verify_checkpoint(path)
        load_checkpoint(path, optimizer)
        loaded = time.perf_counter() - start
        size = sum(p.stat().st_size for p in path.iterdir())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert problem is None, problem
    result = {"unet": "tiny" if args.tiny else "sdxl", "lora_rank": args.rank,
              "lora_params_millions": round(sum(t.numel() for t in lora.values()) / 1e6, 1),
              "checkpoint_gb": round(size / 1e9, 2), "save_s": round(saved, 1), "verify_and_load_s": round(loaded, 1),
              "write_mb_per_s": round(size / 1e6 / saved)}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
