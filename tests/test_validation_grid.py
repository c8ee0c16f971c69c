"""Validation grids: rows x columns of tiles, small tiles enlarged pixel for pixel."""

import numpy as np
import torch
from PIL import Image

from pcm.train.validation import save_grid


def test_small_tiles_are_enlarged_without_blending(tmp_path):
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    grid = np.asarray(Image.open(save_grid(images, rows=3, path=tmp_path / "g.png")))
    assert grid.shape == (3 * 34 * 4, 2 * 34 * 4, 3)  # 2-pixel gaps, then 4x: 32 px tiles reach 128 px
    tile_5 = grid[2 * 34 * 4:2 * 34 * 4 + 128, 34 * 4:34 * 4 + 128]  # row 2, column 1
    want = (images[5].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(tile_5[::4, ::4], want) and np.array_equal(tile_5[3::4, 3::4], want)


def test_large_tiles_keep_their_size(tmp_path):
    images = torch.zeros(2, 3, 200, 150)
    grid = Image.open(save_grid(images, rows=1, path=tmp_path / "g.png"))
    assert grid.size == (2 * 152, 202)
