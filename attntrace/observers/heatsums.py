"""Helpers of `heatmap` for reading its running sums: per-frame upsampling and the video frame split.

Kept apart so `heatmap.py` holds the observer's state and call path only. Sums are laid out as
`(..., frames, h, w)`: images have one frame, video models one map per frame.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from ..core.errors import RunError

__all__ = ["frame_count", "is_picture", "split_frames", "upsample"]


def upsample(sums: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """`(..., frames, h, w)` -> `(..., frames, *size)`, each 2D map interpolated on its own."""
    lead, (h, w) = sums.shape[:-2], sums.shape[-2:]
    up = F.interpolate(sums.reshape(lead[0], -1, h, w), size=size, mode=mode, align_corners=False)
    return up.reshape(*lead, *size)


def frame_count(sums: Iterable[torch.Tensor]) -> int:
    """The one frame count (dim -3) shared by all sums; a run mixing counts is refused."""
    frames = {int(s.shape[-3]) for s in sums}
    if len(frames) > 1:
        raise RunError(f"heatmap: grids with different frame counts {sorted(frames)}; use one heatmap per run")
    return frames.pop() if frames else 1


def split_frames(per_frame: torch.Tensor) -> dict[str, torch.Tensor]:
    """`{"maps": frame mean}`, plus `"frames"` (the per-frame maps) when there is more than one frame."""
    out = {"maps": per_frame.mean(dim=-3)}
    if per_frame.shape[-3] > 1:
        out["frames"] = per_frame
    return out


def is_picture(image: Any) -> bool:
    """Whether a pipeline output item is a picture to draw on (not latents)."""
    if hasattr(image, "convert"):
        return True
    shape = tuple(getattr(image, "shape", ()))
    return len(shape) == 3 and (shape[0] in (1, 3) or shape[-1] in (1, 3))
