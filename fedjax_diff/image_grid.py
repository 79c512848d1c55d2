"""Sample grids as PNG files."""

import math
from typing import Optional

from etils import epath
import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Float images in [−1, 1] → uint8 [0, 255]; uint8 passes through."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, nrow: Optional[int] = None,
              padding: int = 2, upscale: int = 1) -> np.ndarray:
  """Tiles NHWC images into one [H', W', C] uint8 image.

  Args:
    images: [N, H, W, C] float in [−1, 1] or uint8.
    nrow: images per row (default: ceil(sqrt(N))).
    padding: pixels between tiles.
    upscale: nearest-neighbour zoom of each tile (small images, e.g. 8×8
      digits, are unreadable at native size).
  """
  images = to_uint8(images)
  if images.ndim != 4:
    raise ValueError(f'Expected NHWC images, got shape {images.shape}.')
  if upscale > 1:
    images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
  n, h, w, c = images.shape
  nrow = nrow or math.ceil(math.sqrt(n))
  ncol = math.ceil(n / nrow)
  grid = np.full((ncol * (h + padding) + padding,
                  nrow * (w + padding) + padding, c), 255, np.uint8)
  for i in range(n):
    r, col = divmod(i, nrow)
    y, x = padding + r * (h + padding), padding + col * (w + padding)
    grid[y:y + h, x:x + w] = images[i]
  return grid


def save_grid(images: np.ndarray, path: str, nrow: Optional[int] = None,
              upscale: Optional[int] = None) -> str:
  """Writes a grid PNG; small images are upscaled to at least 56 pixels."""
  h = np.asarray(images).shape[1]
  upscale = upscale or max(1, math.ceil(56 / h))
  grid = make_grid(images, nrow=nrow, upscale=upscale)
  if grid.shape[-1] == 1:
    grid = grid[..., 0]
  with epath.Path(path).open('wb') as f:  # a local file or gs://...
    Image.fromarray(grid).save(f, format='PNG')
  return path
