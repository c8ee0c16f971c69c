"""FID's Inception-v3 (the TensorFlow 2015-12-05 graph as ported by pytorch-fid) and clean-fid's preprocessing.

The module layout and parameter names are those of pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, so its
state dict loads strictly; `convert_weights` turns that file into safetensors once (we read weights as safetensors
only). The FID variant differs from torchvision's Inception in three places: average pools exclude the padding
(TensorFlow's rule) and the last block pools its branch with a max instead of an average.

Preprocessing (`preprocess`, clean-fid's "clean" mode): uint8 images are resized to 299x299 with PIL's bicubic
filter on each channel as float32 (no re-quantization after the resize), clipped to [0, 255] and mapped to [-1, 1].
Features are the 2048-d average pool after Mixed_7c.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

SIZE = 299


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv2d(c_in, 48, 1), BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg_pool(x))], 1)


class BlockB(nn.Module):
    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):
    def __init__(self, c_in: int, c7: int):
        super().__init__()
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of the factorized 7x7 convolutions
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, row[0], padding=row[1])
        self.branch7x7_3 = BasicConv2d(c7, 192, col[0], padding=col[1])
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, col[0], padding=col[1])
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, row[0], padding=row[1])
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, col[0], padding=col[1])
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, row[0], padding=row[1])
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        dbl = x
        for i in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{i}")(dbl)
        return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), dbl,
                          self.branch_pool(_avg_pool(x))], 1)


class BlockD(nn.Module):
    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = BasicConv2d(c_in, 192, 1), BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):
    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # the last block of the FID graph pools its branch with a max
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl), self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """Inputs (B, 3, 299, 299) in [-1, 1] -> pool3 features (B, 2048)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = BlockA(192, 32), BlockA(256, 64), BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b, self.Mixed_6c = BlockC(768, 128), BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = BlockC(768, 160), BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b, self.Mixed_7c = BlockE(1280, max_pool=False), BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the graph's classifier: in the weights file, unused for features

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))


def load_inception(path: str | Path, device: torch.device | str = "cpu") -> FIDInception:
    """The FID Inception with weights from a safetensors file (eval.inception_weights); every key must match."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"eval.inception_weights={path}: weights are read as safetensors only; convert pytorch-fid's "
                         f".pth once with `pcm convert-inception {path} {path.with_suffix('.safetensors')}`")
    if not path.is_file():
        raise FileNotFoundError(f"eval.inception_weights={path}: no such file (pytorch-fid's weights converted with "
                                "`pcm convert-inception`)")
    net = FIDInception()
    _load_strictly(net, load_file(path), f"eval.inception_weights={path}")
    return net.eval().requires_grad_(False).to(device)


def _load_strictly(net: FIDInception, state: dict, what: str) -> None:
    """Every parameter and BatchNorm statistic from state (BatchNorm step counters may be absent)."""
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{what} is not pytorch-fid's FID Inception: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}")


def convert_weights(source: str | Path, target: str | Path) -> Path:
    """pytorch-fid's .pth state dict -> safetensors. torch.load with weights_only=True runs no pickled code."""
    state = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "Mixed_7c.branch_pool.conv.weight" not in state:
        raise ValueError(f"{source} is not pytorch-fid's FID Inception state dict (pt_inception-2015-12-05-*.pth)")
    _load_strictly(FIDInception(), state, str(source))
    save_file({k: v.contiguous() for k, v in state.items()}, str(target))
    return Path(target)


def preprocess(images: np.ndarray, size: int = SIZE) -> torch.Tensor:
    """uint8 images (B, H, W, 3) -> (B, 3, size, size) in [-1, 1]: clean-fid's float bicubic resize per channel."""
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, image in enumerate(images):
        for c in range(3):
            channel = Image.fromarray(image[:, :, c].astype(np.float32))  # float32 -> mode F
            out[i, c] = np.asarray(channel.resize((size, size), Image.Resampling.BICUBIC))
    return torch.from_numpy(np.clip(out, 0, 255) / 127.5 - 1.0)


class InceptionFeatures:
    """Feature function for FID: uint8 images (B, H, W, 3) -> (B, 2048)."""

    name = "inception"

    def __init__(self, path: str | Path, device: torch.device | str = "cpu"):
        self.net, self.device = load_inception(path, device), device

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> torch.Tensor:
        return self.net(preprocess(images).to(self.device)).float().cpu()
