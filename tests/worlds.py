"""Small worlds several test modules share: shapes data, a tiny SD1.5 teacher, LoRAs distilled for a few steps."""

from pathlib import Path

from accelerate.state import AcceleratorState
from builders import save_tiny

from pcm import stages
from pcm.config import Config, config_from_dict, load_config
from pcm.data.loader import loader_factory
from pcm.train.distill import distill

METHODS = {"pcm": {"method": "pcm", "num_solver_steps": 20, "num_phases": 2},
           "lcm": {"method": "lcm", "num_solver_steps": 20, "num_phases": 1}}


def distill_world(root: Path, shards: int = 4) -> tuple[Path, dict]:
    """(root, params as a dict) of a world for distillation tests: 8 shapes images per shard at 16 px, prepared, and
    a tiny SD1.5 teacher; batch 4, N = 20, M = 2, 2 steps, a record every step, no grids."""
    base = {"demo": {"output_dir": str(root / "shapes"), "num_images": 8 * shards, "shard_size": 8},
            "data": {"inputs": [str(root / "shapes" / f"shard-{{00000..{shards - 1:05d}}}.tar")],
                     "output_dir": str(root / "prepared"), "shard_size": 8, "resolution": 16, "min_side": 16},
            "teacher": {"model": str(save_tiny(root / "teacher", "sd15"))},
            "lora": {"rank": 4, "alpha": 4.0},
            "distill": {"num_solver_steps": 20, "num_phases": 2},
            "train": {"batch_size": 4, "max_steps": 2, "learning_rate": 1e-3, "log_every": 1,
                      "validate_every": 0, "data_split": "samples", "shuffle_buffer": 8}}
    stages.demo_data(config_from_dict(base), progress=False)
    stages.prepare(config_from_dict(base), progress=False)
    return root, base


def tiny_world(root: Path, methods: tuple[str, ...] = ("pcm",)) -> dict:
    """Params (as a dict) of a world under root: 24 shapes images at 16 px, a tiny teacher, and a LoRA per method
    under root/<method>/lora after 2 distillation steps."""
    base = {"demo": {"output_dir": str(root / "shapes"), "num_images": 24, "shard_size": 8},
            "data": {"inputs": [str(root / "shapes" / "shard-{00000..00002}.tar")],
                     "output_dir": str(root / "prepared"), "shard_size": 8, "resolution": 16, "min_side": 16},
            "teacher": {"model": str(save_tiny(root / "teacher", "sd15"))},
            "lora": {"rank": 4, "alpha": 4.0},
            "train": {"batch_size": 4, "max_steps": 2, "learning_rate": 1e-3, "validate_every": 0,
                      "shuffle_buffer": 8}}
    stages.demo_data(config_from_dict(base), progress=False)
    stages.prepare(config_from_dict(base), progress=False)
    for name in methods:
        AcceleratorState._reset_state(reset_partial_state=True)
        cfg = config_from_dict({**base, "distill": METHODS[name],
                                "train": {**base["train"], "output_dir": str(root / name)}})
        distill(cfg, loader_factory(cfg), progress=False)
    return base


def world_cfg(base: dict, out: Path, **sections) -> Config:
    """The config of a run of the world's params `base` into out, each of sections' values laid over its section."""
    merged = {k: dict(v) for k, v in base.items()}
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    merged["train"]["output_dir"] = str(out)
    return config_from_dict(merged)


def flow_distill_cfg(root: Path, family: str, side: int, tokens: int) -> Config:
    """The config of a 2-step PCM run (N = 20, M = 2, a validation grid at the end) on 8 shapes images prepared at
    side px and a tiny teacher of a flow family (sd3, flux) reading `tokens` T5 tokens, written under root."""
    base = {"demo": {"output_dir": str(root / "shapes"), "num_images": 8, "shard_size": 8},
            "data": {"inputs": [str(root / "shapes" / "shard-00000.tar")], "output_dir": str(root / "prepared"),
                     "shard_size": 8, "resolution": side, "min_side": side},
            "teacher": {"family": family, "model": str(save_tiny(root / "teacher", family)),
                        "max_sequence_length": tokens},
            "lora": {"rank": 4, "alpha": 4.0}, "distill": {"num_solver_steps": 20, "num_phases": 2},
            "validation": {"seeds": [0]},
            "train": {"batch_size": 4, "max_steps": 2, "learning_rate": 1e-3, "log_every": 1, "validate_every": 2,
                      "data_split": "samples", "shuffle_buffer": 8}}
    stages.demo_data(config_from_dict(base), progress=False)
    stages.prepare(config_from_dict(base), progress=False)
    return world_cfg(base, root / "run")


def prepared_shapes(root: Path) -> Path:
    """A 40-image shapes world under root, prepared at 32 px in two shards (the demo teachers' tests)."""
    cfg = load_config("params.yaml", [f"demo.output_dir={root}/shapes", "demo.num_images=40", "demo.shard_size=20",
                                      f"data.inputs={root}/shapes/shard-{{00000..00001}}.tar",
                                      f"data.output_dir={root}/prepared", "data.shard_size=20"])
    stages.demo_data(cfg, progress=False)
    stages.prepare(cfg, progress=False)
    return root / "prepared"
