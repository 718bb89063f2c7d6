"""`Layout`: which tokens of one attention call are text and which are image, and the image grid.

Resolved once per call by the adapter that intercepted it, from the model's own structure (the
processor's arguments, the module's configuration), and carried on the `AttentionCall`. Observers
read it; they never guess token ranges from shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .site import Kind

__all__ = ["Layout", "grid_for"]


@dataclass(frozen=True)
class Layout:
    """The token layout of one attention call.

    - `kind`: `self`, `cross`, `joint` or `linear` (per call: a module may attend differently per call).
    - `text`: key positions holding text tokens (for joint attention, the same positions on the query axis).
    - `image`: query positions holding image (latent) tokens.
    - `grid`: the image tokens' grid `(frames, height, width)`, frames 1 for images; None when unknown.
    """

    kind: Kind
    text: slice | None = None
    image: slice | None = None
    grid: tuple[int, int, int] | None = None

    @property
    def hw(self) -> tuple[int, int] | None:
        """`(height, width)` of one frame of the image grid, or None."""
        return None if self.grid is None else (self.grid[1], self.grid[2])


def grid_for(tokens: int, root_hw: tuple[int, int] | None) -> tuple[int, int] | None:
    """The (h, w) grid of `tokens` image tokens, from the model input's spatial size if known."""
    if tokens <= 0:
        return None
    if root_hw is not None:
        H, W = root_hw
        ratio = math.sqrt(H * W / tokens)
        h, w = round(H / ratio), round(W / ratio)
        if h * w == tokens:
            return h, w
    side = math.isqrt(tokens)
    return (side, side) if side * side == tokens else None
