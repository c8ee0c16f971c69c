"""pcm-pipelines: Phased Consistency Model distillation of Stable Diffusion teachers."""

import logging

__version__ = "0.1.0"


class _NoTorchvisionFallbackNotice(logging.Filter):
    """Drops transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back to ...Pil"
    notices, one per image processor that diffusers' pipelines import (CLIP, SigLIP). pcm never uses torchvision
    (it does not install beside our torch pin) and the PIL fallback is what we want, so on every stage these lines
    are noise that reads like a broken install. Every other transformers message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


# set before transformers is imported (pcm is imported first); transformers' loggers are plain logging loggers
logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionFallbackNotice())
