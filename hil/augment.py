"""Training-time data augmentation: random translations of the training images.

`train.shift = s` moves every training image by a whole number of pixels in [-s, s] along
each axis, drawn independently per image and per step, filling the uncovered border with
zeros (the background of the project's image sets). Test images are never moved.

The offsets of a step come from the named stream ``classifier.augment`` of `train.seed`,
indexed by the step number, and are drawn for the whole global batch: a resumed run and a
data parallel run (each rank takes its contiguous share of the offsets) move every image
exactly as one uninterrupted single-board run does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from drivers import seeds
from hil.config import MAX_SHIFT, ConfigError


def check_shift(shift: int, image_shape: tuple[int, int, int]) -> None:
    """Refuse a shift that is negative, above `MAX_SHIFT` or not below half the image's side."""
    _, h, w = image_shape
    if not 0 <= shift <= MAX_SHIFT or (shift and 2 * shift >= min(h, w)):
        raise ConfigError(
            f"train.shift = {shift}: translations are 0 to {MAX_SHIFT} pixels and below half the "
            f"image's side ({h} x {w} images: at most {min(MAX_SHIFT, (min(h, w) - 1) // 2)}); "
            "0 turns augmentation off"
        )


def step_offsets(n: int, shift: int, seed: int, step: int) -> Tensor:
    """The (n, 2) int64 offsets (dy, dx), each in [-shift, shift], of training step `step`."""
    gen = seeds.torch_generator(seed, "classifier.augment", step)
    return torch.randint(-shift, shift + 1, (n, 2), generator=gen)


def shift_images(x: Tensor, image_shape: tuple[int, int, int], offsets: Tensor) -> Tensor:
    """`x` (N, C, H, W) or flattened (N, C*H*W) with image i moved by offsets[i] = (dy, dx)
    pixels (down and right for positive values), zero-filled; the same shape and dtype."""
    c, h, w = image_shape
    if len(offsets) != len(x):
        raise ValueError(f"{len(offsets)} offsets for {len(x)} images")
    s = int(offsets.abs().max()) if len(offsets) else 0
    if s == 0:
        return x
    img = x.reshape(len(x), c, h, w)
    padded = torch.nn.functional.pad(img, (s, s, s, s))
    off = offsets.to(x.device)
    rows = (s - off[:, 0, None]) + torch.arange(h, device=x.device)  # (N, H) rows of padded
    cols = (s - off[:, 1, None]) + torch.arange(w, device=x.device)  # (N, W)
    batch = torch.arange(len(x), device=x.device)[:, None, None]
    moved = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return moved.permute(0, 3, 1, 2).reshape(x.shape).contiguous()
