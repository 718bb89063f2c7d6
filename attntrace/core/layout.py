"""`Layout`: which tokens of one attention call are text and which are image, and the image grid.

Resolved once per call by the adapter that intercepted it, from the model's own structure (the
processor's arguments, the module's configuration), and carried on the `AttentionCall`. Observers
read it; they never guess token ranges from shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .site import Kind

__all__ = ["Layout", "grid_for", "token_layout"]


@dataclass(frozen=True)
class Layout:
    """The token layout of one attention call.

    - `kind`: `self`, `cross`, `joint` or `linear` (per call: a module may attend differently per call).
    - `text`: key positions holding text tokens (for joint attention, the same positions on the query axis).
    - `image`: query positions holding image (latent) tokens.
    - `grid`: the image tokens' grid `(frames, height, width)`, frames 1 for images; None when unknown.
    - `known`: False where the adapter could not tell which tokens are which (then `note` says why);
      observers that need the layout skip such calls with a warning naming the site.
    - `probs`: how the probabilities' last axis is laid out. `dense` (the default): `probs[..., i, j]` is
      query i's weight on key j. `banded` (sliding-window attention, Longformer/LED): the last axis holds
      `global_keys` columns for the global tokens (in sequence order), then `2·window + 1` columns where
      column `global_keys + j` is the weight on key `i - window + j` (zero outside the sequence).
      `block_sparse` (BigBird, Reformer): indexed like `dense`, zero outside the blocks each query attends
      (BigBird: global, sliding, random; Reformer: its chunk and the chunks around it, by position or by hash
      bucket); read-only. `block_local` (LongT5): `3·window` columns where column j of query i is
      the weight on key `(i // window - 1)·window + j` (zero outside the sequence), then `global_keys` columns
      on transient global tokens (sums of blocks, not tokens); read-only. `sampling_point` (multi-scale
      deformable attention, the DETR family): query i's weights on its own sampling points, `points[l]` per
      feature level l in level order (`sum(points)` columns); where a point lies is data-dependent (reference
      point plus a learned offset, a bilinear sample of the value map) and is not part of the layout; read-only.
      `additive` (Bahdanau attention, SLANet): one query, the decoder state, and one head; `probs[..., 0, j]`
      is its weight on encoder token j; read-only.
    - `batch`: the role of each batch row, `cond` or `uncond`, from the generation the call belongs to
      (a pipeline call with classifier-free guidance batches `[uncond..., cond...]`); None where no
      generation says (a bare model outside `tracer.generation(...)`).

    `text` is None on calls with no text keys (self-attention, an image-context call of a cross-attention
    module); `image` is None where no image tokens exist (a text model).
    """

    kind: Kind
    text: slice | None = None
    image: slice | None = None
    grid: tuple[int, int, int] | None = None
    known: bool = True
    note: str = ""
    probs: str = "dense"
    window: int = 0
    global_keys: int = 0
    points: tuple[int, ...] = ()
    batch: tuple[str, ...] | None = None

    @property
    def levels(self) -> int:
        """Feature levels of a `sampling_point` layout (0 otherwise)."""
        return len(self.points)

    @property
    def frames(self) -> int:
        """Number of frames of the image grid (1 for images and when unknown)."""
        return 1 if self.grid is None else self.grid[0]

    def describe(self) -> str:
        """One line: kind, ranges and grid (`joint text 0:4 image 4:20 grid 1x4x4`)."""
        if not self.known:
            return f"{self.kind}: unknown ({self.note})" if self.note else f"{self.kind}: unknown"
        parts = [self.kind]
        if self.text is not None:
            parts.append(f"text {self.text.start}:{self.text.stop}")
        if self.image is not None:
            parts.append(f"image {self.image.start}:{self.image.stop}")
        if self.grid is not None:
            parts.append("grid " + "x".join(map(str, self.grid)))
        if self.probs == "banded":
            parts.append(f"probs banded window {self.window} global {self.global_keys}")
        if self.probs == "sampling_point":
            parts.append(f"probs sampling points {'+'.join(map(str, self.points))} over {self.levels} level(s)")
        return " ".join(parts)

    def labelled(self, batch: tuple[str, ...]) -> Layout:
        """A copy with its batch rows labelled `batch`. Done on every traced call, so it copies the fields
        directly: `dataclasses.replace` re-runs the frozen `__init__`, ten times slower (27 µs vs 3 µs)."""
        new = object.__new__(Layout)
        new.__dict__.update(self.__dict__)
        object.__setattr__(new, "batch", batch)
        return new

    def rows(self, role: str) -> slice | None:
        """The batch rows labelled `role` (`cond` / `uncond`), None when the rows are not labelled.

        Labels come from a generation, whose batch is `[uncond..., cond...]`: each role's rows are contiguous.
        """
        if self.batch is None:
            return None
        idx = [i for i, r in enumerate(self.batch) if r == role]
        return slice(idx[0], idx[-1] + 1) if idx else slice(0, 0)

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


def token_layout(kind: Kind, modality: str | None, q_len: int, k_len: int) -> Layout:
    """The layout of a call whose tokens are all of one modality (text and vision transformers).

    Self-attention over text has `text` on both axes and no image; over image patches `image` on both
    axes (no grid: patches come with class/register tokens). Cross-attention keys are the encoder's
    tokens (text when the encoder reads text). Unknown modality: the queries are counted as image
    tokens and cross-attention keys as text, as for a conditioned image model.
    """
    if kind == "cross":
        return Layout("cross", text=slice(0, k_len) if modality in ("text", None) else None,
                      image=slice(0, q_len) if modality is None else None)  # fmt: skip
    if modality == "text":
        return Layout(kind, text=slice(0, k_len))
    return Layout(kind, image=slice(0, q_len))
