"""Word heat maps as objects a notebook shows: one word's map (`WordMap`) and a grid of words (`WordMaps`).

`heatmap.word("dog")` and `heatmap.words()` return these. A map is a (h, w) tensor at the heat map's
own resolution; `expand` brings it to an image's size (bicubic, as DAAM's `expand_as`), `plot` draws it
over the generated image with an adjustable opacity, and Jupyter displays both inline
(`_repr_png_`, `_repr_html_`).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import RunError

__all__ = ["WordMap", "WordMaps", "to_rgb"]


def to_rgb(image: Any) -> np.ndarray:
    """An HxWx3 float array in [0, 1] from a PIL image, an HxWx3 array or a CHW tensor ([0,1] or [0,255])."""
    if isinstance(image, torch.Tensor):
        arr = image.detach().float().cpu().numpy()
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = arr.transpose(1, 2, 0)
    else:
        arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image).astype(np.float32)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    arr = arr[..., :3].astype(np.float32)
    if arr.max() > 1.0:
        arr = arr / 255.0
    return np.clip(arr, 0.0, 1.0)


def _size_of(target: Any) -> tuple[int, int]:
    if isinstance(target, (tuple, list)) and len(target) == 2 and all(isinstance(x, int) for x in target):
        return int(target[0]), int(target[1])
    if isinstance(target, int):
        return target, target
    rgb = to_rgb(target)
    return int(rgb.shape[0]), int(rgb.shape[1])


def _figure_png(fig: Any, dpi: int = 80) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


@dataclass
class WordMap:
    """One word's heat map for one image of the batch.

    `value` is (h, w) at the heat map's resolution; `tokens` are the token positions merged into it;
    `image` is the generated image it belongs to (when known).
    """

    word: str
    value: torch.Tensor
    tokens: list[int]
    item: int = 0
    prompt: str | None = None
    image: Any = field(default=None, repr=False)

    def expand(self, size: Any = None, *, absolute: bool = False, threshold: float | None = None) -> torch.Tensor:
        """The map at `size` ((h, w), a side, or an image: default the generated image), bicubic.

        Unless `absolute`, rescaled to [0, 1] by its min and max (DAAM's `expand_as`); with `threshold`,
        a 0/1 mask of the pixels above it.
        """
        if size is None:
            if self.image is None:
                raise RunError(f"word map {self.word!r}: no image to expand to; pass a size or an image")
            size = self.image
        h, w = _size_of(size)
        im = F.interpolate(self.value.detach().float().cpu()[None, None], size=(h, w), mode="bicubic")[0, 0]
        if not absolute:
            im = (im - im.min()) / (im.max() - im.min() + 1e-8)
        if threshold is not None:
            im = (im > threshold).float()
        return im

    def plot(self, overlay: Any = None, *, alpha: float = 0.5, ax: Any = None, cmap: str = "jet",
             title: bool = True) -> Any:  # fmt: skip
        """Draw the map (over `overlay`, default the generated image) with heat opacity `alpha` in [0, 1].

        Returns the matplotlib Figure (a new one unless `ax` is given).
        """
        import matplotlib

        if not 0.0 <= alpha <= 1.0:
            raise RunError(f"alpha must be within [0, 1], got {alpha}")
        image = overlay if overlay is not None else self.image
        fig = None
        if ax is None:
            from matplotlib.figure import Figure

            fig = Figure(figsize=(3, 3.2))
            ax = fig.add_subplot(1, 1, 1)
        if image is not None:
            rgb = to_rgb(image)
            heat = matplotlib.colormaps[cmap](self.expand(rgb.shape[:2]).numpy())[..., :3]
            ax.imshow(np.clip((1 - alpha) * rgb + alpha * heat, 0, 1))
        else:
            ax.imshow(self.value.detach().float().cpu().numpy(), cmap=cmap)
        if title:
            ax.set_title(self.word, fontsize=10)
        ax.axis("off")
        if fig is not None:
            fig.tight_layout()
        return fig if fig is not None else ax.figure

    def _repr_png_(self) -> bytes:
        return _figure_png(self.plot())

    def _repr_html_(self) -> str:
        data = base64.b64encode(self._repr_png_()).decode()
        word = html.escape(self.word)
        return (f'<figure style="display:inline-block;margin:4px"><img src="data:image/png;base64,{data}" '
                f'alt="{word}"/><figcaption>{word}</figcaption></figure>')  # fmt: skip


@dataclass
class WordMaps:
    """The word maps of one image (a prompt's words, special tokens left out), shown as a grid."""

    maps: list[WordMap]
    image: Any = field(default=None, repr=False)
    prompt: str | None = None

    def __iter__(self) -> Iterator[WordMap]:
        return iter(self.maps)

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, key: int | str) -> WordMap:
        if isinstance(key, int):
            return self.maps[key]
        for m in self.maps:
            if m.word == key:
                return m
        raise KeyError(f"{key!r} is not one of the words {[m.word for m in self.maps]}")

    @property
    def words(self) -> list[str]:
        """The words, in prompt order."""
        return [m.word for m in self.maps]

    def plot(self, overlay: Any = None, *, alpha: float = 0.5, cols: int = 6, cmap: str = "jet") -> Any:
        """A grid: the image, then every word's map over it. Returns the matplotlib Figure."""
        return grid_figure([self], overlay=overlay, alpha=alpha, cols=cols, cmap=cmap)

    def _repr_png_(self) -> bytes:
        return _figure_png(self.plot())

    def _repr_html_(self) -> str:
        data = base64.b64encode(self._repr_png_()).decode()
        caption = html.escape(self.prompt or "")
        return f'<figure><img src="data:image/png;base64,{data}"/><figcaption>{caption}</figcaption></figure>'


def grid_figure(rows: Sequence[WordMaps], *, overlay: Any = None, alpha: float = 0.5, cols: int = 6,
                cmap: str = "jet") -> Any:  # fmt: skip
    """One figure with a block of panels per image (its picture, then its words), images one below another."""
    from matplotlib.figure import Figure

    layouts = []
    for r in rows:
        n = len(r) + 1
        c = min(n, cols)
        layouts.append((c, -(-n // c)))
    width = max(c for c, _ in layouts) if layouts else 1
    height = sum(h for _, h in layouts) or 1
    fig = Figure(figsize=(2.2 * width, 2.4 * height))
    top = 0
    for r, (_, h) in zip(rows, layouts):
        image = overlay if overlay is not None else r.image
        panels: list[tuple[str, Any]] = [(_short(r.prompt) or "image", None), *[(m.word, m) for m in r]]
        for k, (title, m) in enumerate(panels):
            ax = fig.add_subplot(height, width, (top + k // width) * width + k % width + 1)
            if m is None:
                if image is not None:
                    ax.imshow(to_rgb(image))
                ax.set_title(title, fontsize=8)
                ax.axis("off")
            else:
                m.plot(image, alpha=alpha, ax=ax, cmap=cmap)
        top += h
    fig.tight_layout()
    return fig


def _short(text: str | None, limit: int = 40) -> str:
    if not text:
        return ""
    return text if len(text) <= limit else text[: limit - 1] + "…"
