"""torchvision.transforms' Compose, Resize, CenterCrop, ToTensor and Normalize for PIL images (see __init__)."""

import enum
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


PIL_FILTERS = {mode: getattr(Image.Resampling, mode.name) for mode in InterpolationMode}


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) from an int (a square) or a one- or two-element sequence, as torchvision reads sizes."""
    if isinstance(size, int):
        return size, size
    if len(size) == 1:
        return size[0], size[0]
    return int(size[0]), int(size[1])


class Compose:
    def __init__(self, transforms: list[Callable]):
        self.transforms = transforms

    def __call__(self, image):
        for transform in self.transforms:
            image = transform(image)
        return image


class Resize:
    """An int size: the shorter side becomes size, the longer one int(size * long / short) (aspect kept); a pair:
    exactly (height, width)."""

    def __init__(self, size, interpolation: InterpolationMode = InterpolationMode.BILINEAR):
        if interpolation not in PIL_FILTERS:
            raise ValueError(f"unsupported interpolation {interpolation!r}; allowed: "
                             f"{', '.join(m.name for m in PIL_FILTERS)}")
        self.size, self.interpolation = size, interpolation

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize."""
        if isinstance(self.size, int) or len(self.size) == 1:
            requested = self.size if isinstance(self.size, int) else self.size[0]
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = requested, int(requested * long / short)
            return (new_short, new_long) if width <= height else (new_long, new_short)
        height_out, width_out = _pair(self.size)
        return width_out, height_out

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.resize(self.output_size(*image.size), PIL_FILTERS[self.interpolation])


class CenterCrop:
    """The central (height, width) window; an image smaller than it is first padded with zeros on every side, as
    torchvision does (left/top get the smaller half of an odd padding)."""

    def __init__(self, size):
        self.height, self.width = _pair(size)

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if width < self.width or height < self.height:
            pad_w, pad_h = max(self.width - width, 0), max(self.height - height, 0)
            padded = Image.new(image.mode, (width + pad_w, height + pad_h))
            padded.paste(image, (pad_w // 2, pad_h // 2))
            image, (width, height) = padded, padded.size
        top = int(round((height - self.height) / 2.0))
        left = int(round((width - self.width) / 2.0))
        return image.crop((left, top, left + self.width, top + self.height))


class ToTensor:
    """A PIL image (H, W, C) uint8 -> a float tensor (C, H, W) in [0, 1]."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        array = np.array(image, dtype=np.uint8, copy=True)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div(255.0)


class Normalize:
    """(x - mean) / std per channel of a (C, H, W) tensor."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = list(mean), list(std)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.mean, dtype=tensor.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=tensor.dtype).view(-1, 1, 1)
        return (tensor - mean) / std
