"""A stand-in for the part of torchvision that the PCM authors' SD1.5 training script uses, for
benchmarks/reference_side_by_side.py only (torchvision has no wheel that imports beside torch 2.13).

Their `code/text_to_image_sd15/train_pcm_lora_sd15.py` imports `from torchvision import transforms` and uses exactly
transforms.Compose, Resize (an int size, InterpolationMode.LANCZOS), CenterCrop (an int size), ToTensor and
Normalize, on PIL images. Those five are here with torchvision's semantics on PIL input; nothing else is. It is put
on the reference script's PYTHONPATH by the benchmark and never installed: with no package metadata, diffusers and
transformers still report torchvision as unavailable and never import it themselves.
"""

__version__ = "0.0.0+pcm-standin"
