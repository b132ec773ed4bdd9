"""Sample grids as PNG: torchvision's ``make_grid`` + ``save_image(normalize=True, value_range=(-1, 1))``.

The official ``sample.py`` saves with ``nrow=4``; torchvision pads every image
by 2 pixels (pad value 0), turns one-channel images into grey RGB, and maps
values by clamp to [-1, 1], (x + 1) / 2, * 255 + 0.5, clamp to 0..255, uint8.
Small images (the 16x16 digits) are enlarged with nearest neighbour so a grid
is viewable; that is the only addition.
"""
import math

import numpy as np

from . import atomic
from .backend import to_numpy


def to_uint8(images, value_range=(-1.0, 1.0)):
    """(B, C, H, W) floats in value_range -> (B, C, H, W) uint8, torchvision's rounding."""
    lo, hi = value_range
    x = np.clip(np.asarray(to_numpy(images), dtype=np.float32), lo, hi)
    x = (x - np.float32(lo)) / np.float32(max(hi - lo, 1e-5))
    return np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8)


def make_grid(images, nrow=4, padding=2, value_range=(-1.0, 1.0)):
    """(B, C, H, W) with C in {1, 3} -> (H', W', 3) uint8, ``min(nrow, B)`` images per row.

    A single image is returned without padding, as torchvision does.
    """
    x = to_uint8(images, value_range)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be (B, 1 or 3, H, W), got shape {x.shape}")
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)                                    # grey -> RGB
    B, C, H, W = x.shape
    if B == 1:
        return x[0].transpose(1, 2, 0)
    cols = min(nrow, B)
    rows = math.ceil(B / cols)
    grid = np.zeros((rows * (H + padding) + padding, cols * (W + padding) + padding, C), dtype=np.uint8)
    for k in range(B):
        r, c = divmod(k, cols)
        y0, x0 = r * (H + padding) + padding, c * (W + padding) + padding
        grid[y0:y0 + H, x0:x0 + W] = x[k].transpose(1, 2, 0)          # (C, H, W) -> (H, W, C)
    return grid


def save_png(image, path):
    """Write a PIL image as PNG atomically (``tinylazy.atomic``): a reader never sees half a file."""
    with atomic.writing(path) as f:
        image.save(f, format="PNG")
    return path


def save_grid(images, path, nrow=4, padding=2, min_size=64):
    """Write a PNG grid; images smaller than min_size are enlarged by an integer nearest factor.

    Returns the saved (height, width).
    """
    from PIL import Image
    grid = make_grid(images, nrow=nrow, padding=padding)
    scale = max(1, math.ceil(min_size / images.shape[-2]))
    if scale > 1:
        grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    save_png(Image.fromarray(grid), path)
    return grid.shape[:2]
