"""pcm-pipelines: Phased Consistency Model distillation of Stable Diffusion teachers."""

__version__ = "0.1.0"
