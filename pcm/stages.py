"""One function per pipeline stage: the only entry that DVC, the CLI and the Kubeflow components use."""

from pcm.config import Config
from pcm.data.prepare import prepare as prepare_shards
from pcm.demo.dataset import write_shapes_shards


def demo_data(cfg: Config, progress: bool = True) -> dict:
    """The shapes demo world as input shards under cfg.demo.output_dir."""
    return write_shapes_shards(cfg.demo, cfg.seed, progress)


def demo_teacher(cfg: Config, progress: bool = True) -> dict:
    """Trains the tiny demo teacher on the prepared shapes shards; saves a diffusers pipeline + metrics.json."""
    from pcm.demo.teacher import train_demo_teacher

    return train_demo_teacher(cfg, progress)


def distill(cfg: Config, resume: str | None = None, progress: bool = True) -> dict:
    """The teacher (cfg.teacher) distilled into a PCM / LCM LoRA under cfg.train.output_dir; reads this teacher's
    precomputed latents when `pcm precompute` wrote them, else encodes the prepared images on the fly."""
    from pcm.data.loader import loader_factory
    from pcm.data.precompute import find_latents
    from pcm.train.distill import distill as run_distill

    folder = find_latents(cfg)  # also refuses latents of another teacher
    return run_distill(cfg, loader_factory(cfg, folder), resume=resume, progress=progress, latents=folder is not None)


def evaluate(cfg: Config, progress: bool = True) -> dict:
    """The teacher's DDIM and each LoRA in eval.loras at eval.steps, scored (FID, FID-teacher, trajectory error, step
    consistency, CLIP score, oracle) and reported under eval.output_dir (metrics.json, steps.csv, report.html)."""
    from pcm.eval.evaluate import evaluate as run_evaluate

    return run_evaluate(cfg, progress)


def precompute(cfg: Config, progress: bool = True) -> dict:
    """The teacher's VAE latents of every prepared sample, under data.output_dir/precomputed/<teacher key>."""
    from pcm.data.precompute import precompute as run_precompute

    return run_precompute(cfg, progress)


def prepare(cfg: Config, progress: bool = True) -> dict:
    """Input shards (cfg.data.inputs) -> prepared shards, index.json and stats.json in cfg.data.output_dir."""
    return prepare_shards(cfg.data, cfg.seed, progress)
