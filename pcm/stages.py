"""One function per pipeline stage: the only entry that DVC, the CLI and the Kubeflow components use."""

from pcm.config import Config
from pcm.data.prepare import prepare as prepare_shards
from pcm.demo.dataset import write_shapes_shards


def demo_data(cfg: Config, progress: bool = True) -> dict:
    """The shapes demo world as input shards under cfg.demo.output_dir."""
    return write_shapes_shards(cfg.demo, cfg.seed, progress)


def prepare(cfg: Config, progress: bool = True) -> dict:
    """Input shards (cfg.data.inputs) -> prepared shards, index.json and stats.json in cfg.data.output_dir."""
    return prepare_shards(cfg.data, cfg.seed, progress)
