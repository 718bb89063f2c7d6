"""Colour segmentation of toy-world images: which named shapes in which named colours an image holds.

Backgrounds are grey by construction, so every saturated pixel belongs to an object. Each such pixel
takes the nearest palette colour; the largest connected region of a colour is that colour's object,
and its shape is the template (rendered at the region's box) it overlaps best. This is what measures
whether a generated image follows its prompt, and where the generated objects are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from .world import COLOURS, SHAPES, shape_mask

__all__ = ["Found", "colour_masks", "contains", "find_objects", "to_array"]

_PALETTE = np.array(list(COLOURS.values()), np.float32)
_NAMES = list(COLOURS)
MIN_SATURATION = 0.25  # max - min channel; greys are 0
MAX_DISTANCE = 0.38  # RGB distance to the nearest palette colour
MIN_AREA = 10  # pixels; smaller regions are noise


@dataclass
class Found:
    """An object found in an image: its colour, best-matching shape, mask and template overlap."""

    colour: str
    shape: str
    score: float  # IoU with the best template
    mask: np.ndarray = field(repr=False)


def to_array(image: Any) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] from a PIL image, an array in [0,1] or [0,255], or a CHW tensor."""
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"), np.float32) / 255.0
    if hasattr(image, "detach"):
        image = image.detach().float().cpu().numpy()
        if image.ndim == 3 and image.shape[0] == 3:
            image = image.transpose(1, 2, 0)
    arr = np.asarray(image, np.float32)
    return arr / 255.0 if arr.max() > 1.0 else arr


def colour_masks(image: Any) -> dict[str, np.ndarray]:
    """Per palette colour, the pixels of that colour (nearest palette entry, saturated, close enough)."""
    arr = to_array(image)
    sat = arr.max(-1) - arr.min(-1)
    dist = np.linalg.norm(arr[..., None, :] - _PALETTE, axis=-1)  # (H, W, colours)
    nearest = dist.argmin(-1)
    ok = (sat >= MIN_SATURATION) & (dist.min(-1) <= MAX_DISTANCE)
    return {name: ok & (nearest == i) for i, name in enumerate(_NAMES)}


def _crop(mask: np.ndarray, y: int, x: int, n: int) -> np.ndarray:
    out = np.zeros((n, n), bool)
    part = mask[y : y + n, x : x + n]
    out[: part.shape[0], : part.shape[1]] = part
    return out


def _classify(mask: np.ndarray) -> tuple[str, float]:
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = max(x1 - x0, y1 - y0)
    # Work on a square crop around the region (templates are cheap there).
    c0y, c0x = max(0, y0 - 2), max(0, x0 - 2)
    mask = np.zeros((side + 4, side + 4), bool) | _crop(mask, c0y, c0x, side + 4)
    cx, cy = (x0 + x1) / 2 - c0x, (y0 + y1) / 2 - c0y
    best, best_iou = "", -1.0
    # A few sub-pixel placements and sizes: thin arms of small crosses are sensitive to half pixels.
    for shape in SHAPES:
        for size in (side - 1.0, side - 0.5, side, side + 0.5):
            for ox in (-0.3, 0.0, 0.3):
                for oy in (-0.3, 0.0, 0.3):
                    t = shape_mask(shape, cx + ox, cy + oy, size, side=mask.shape[0])
                    iou = float((t & mask).sum() / max((t | mask).sum(), 1))
                    if iou > best_iou:
                        best, best_iou = shape, iou
    return best, best_iou


def find_objects(image: Any) -> list[Found]:
    """Every colour's largest connected region (≥ `MIN_AREA` pixels) with its best-matching shape."""
    found = []
    for colour, mask in colour_masks(image).items():
        labels, n = ndimage.label(mask)
        if n == 0:
            continue
        sizes = ndimage.sum(mask, labels, index=range(1, n + 1))
        k = int(np.argmax(sizes))
        if sizes[k] < MIN_AREA:
            continue
        region = labels == k + 1
        shape, score = _classify(region)
        found.append(Found(colour, shape, score, region))
    return found


def contains(image: Any, pairs: list[tuple[str, str]]) -> bool:
    """Whether the image holds every named (colour, shape): a region of that colour shaped like it."""
    have = {(f.colour, f.shape) for f in find_objects(image)}
    return all(p in have for p in pairs)
