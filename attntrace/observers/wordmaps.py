"""Word heat maps: labels (prompt words to token positions), PNG rendering, and notebook objects.

One word's map is a `WordMap`, a prompt's words a `WordMaps` grid.

`heatmap.word("dog")` and `heatmap.words()` return these. A map is a (h, w) tensor at the heat map's
own resolution; `expand` brings it to an image's size (bicubic, as DAAM's `expand_as`), `plot` draws it
over the generated image with an adjustable opacity, and Jupyter displays both inline
(`_repr_png_`, `_repr_html_`).
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import RunError
from ..core.words import resolve_words

__all__ = ["WordMap", "WordMaps", "find_in_groups", "find_word", "grid_figure", "render", "to_rgb", "word_maps",
           "word_tokens", "words_from_token_strings"]


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


# -- words --------------------------------------------------------------------------------------
def word_tokens(tokenizer: Any, prompt: str) -> list[tuple[str, list[int]]]:
    """The prompt's words and, for each, the token positions (as the text encoder sees them) it spans.

    Special tokens (BOS at index 0, EOS, padding) belong to no word. Uses the tokenizer's character
    offsets when it has them, else decodes growing prefixes of the token ids to find word breaks.
    """
    try:
        enc = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        enc, offsets = tokenizer(prompt, add_special_tokens=True), None
    ids = list(enc["input_ids"])
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    words: list[tuple[str, list[int]]] = []
    if offsets is not None:
        spans = [(m.start(), m.end(), m.group()) for m in re.finditer(r"\S+", prompt)]
        by_word: dict[int, list[int]] = {}
        for pos, (tid, (a, b)) in enumerate(zip(ids, offsets)):
            if tid in special or b <= a:
                continue
            for wi, (s, e, _) in enumerate(spans):
                if s <= a < e:
                    by_word.setdefault(wi, []).append(pos)
                    break
        return [(spans[wi][2], idx) for wi, idx in sorted(by_word.items())]
    # Fallback: token i belongs to the last word of the decoded prefix ending at i.
    kept = [(pos, tid) for pos, tid in enumerate(ids) if tid not in special]
    for n in range(1, len(kept) + 1):
        text = tokenizer.decode([tid for _, tid in kept[:n]])
        parts = text.split()
        if not parts:
            continue
        wi = len(parts) - 1
        pos = kept[n - 1][0]
        if wi < len(words):
            words[wi] = (parts[wi], [*words[wi][1], pos])
        else:
            words.append((parts[wi], [pos]))
    final = tokenizer.decode([tid for _, tid in kept]).split()
    if len(final) == len(words):
        words = [(final[i], idx) for i, (_, idx) in enumerate(words)]
    return words


_NTH = re.compile(r"^(.*\S)#(\d+)$")


def _norm_word(text: str) -> str:
    return re.sub(r"[^\w]+", "", text.lower())


def find_in_groups(groups: Sequence[tuple[str, list[int]]], word: str) -> list[int]:
    """Positions of `word` (a word or phrase, `dog#2` for one occurrence) among (word, positions) groups."""
    m = _NTH.match(word.strip())
    target, nth = (m.group(1), int(m.group(2))) if m else (word.strip(), None)
    query = [_norm_word(w) for w in target.split() if _norm_word(w)]
    names = [_norm_word(w) for w, _ in groups]
    hits = [i for i in range(len(names) - len(query) + 1) if query and names[i : i + len(query)] == query]
    if nth is not None:
        hits = hits[nth - 1 : nth] if nth >= 1 else []
    if not hits:
        shown = " ".join(f"{idx[0]}:{w}" for w, idx in groups[:40])
        raise RunError(f"word {word!r} is not in the prompt; its words: {shown}")
    return sorted({p for i in hits for _, idx in groups[i : i + len(query)] for p in idx})


def find_word(tokenizer: Any, prompt: str, word: str) -> list[int]:
    """Token positions of `word` in `prompt` (every occurrence and sub-token; `dog#2`: the second only).

    An unknown word is a `WordError` showing the prompt's tokenization.
    """
    return resolve_words(tokenizer, prompt, [word], field="word")[0]


def _merge(maps: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """Sum token maps (T, R, R) into word maps (W, R, R)."""
    if not groups:
        return maps[:0]
    return torch.stack([maps[list(g)].sum(0) for g in groups])


def word_maps(tokenizer: Any, prompt: str, maps: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """Merge token maps (..., T, R, R) into word maps (..., W, R, R); returns (words, maps)."""
    words = word_tokens(tokenizer, prompt)
    words = [(w, idx) for w, idx in words if max(idx) < maps.shape[-3]]
    if not words:
        return [], maps[..., :0, :, :]
    merged = torch.stack([maps[..., idx, :, :].sum(-3) for _, idx in words], dim=-3)
    return [w for w, _ in words], merged


# -- rendering ----------------------------------------------------------------------------------
def _normalize(m: np.ndarray) -> np.ndarray:
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def _safe(word: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", word).strip("_") or "tok"


def render(
    image: Any,
    maps: torch.Tensor,
    words: Sequence[str],
    out_dir: str | Path,
    *,
    cmap: str = "jet",
    alpha: float = 0.5,
    prefix: str = "",
    grid: bool = True,
) -> list[Path]:
    """Write one overlay PNG per word (and `heatmap_grid.png` unless `grid=False`); `maps` is (W, R, R)."""
    import matplotlib
    import matplotlib.image as mpimg
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rgb = to_rgb(image)
    hh, ww = rgb.shape[:2]
    m = maps.detach().float().cpu()
    if m.dim() != 3 or m.shape[0] != len(words):
        raise RunError(f"render: need maps (words, R, R) for {len(words)} words, got {tuple(m.shape)}")
    up = m.numpy()
    if words:
        up = F.interpolate(m[None], size=(hh, ww), mode="bilinear", align_corners=False)[0].numpy()
    colormap = matplotlib.colormaps[cmap]
    files: list[Path] = []
    overlays = []
    for i, word in enumerate(words):
        heat = colormap(_normalize(up[i]))[..., :3]
        blend = (1 - alpha) * rgb + alpha * heat
        overlays.append(blend)
        path = out / f"{prefix}heatmap_{i:02d}_{_safe(word)}.png"
        mpimg.imsave(path, np.clip(blend, 0, 1))
        files.append(path)
    if not grid:
        return files
    n = len(words) + 1
    cols = min(n, 6)
    rows = -(-n // cols)
    fig = Figure(figsize=(2.2 * cols, 2.4 * rows))
    panels = [("image", rgb), *zip(words, overlays)]
    for k, (title, arr) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(np.clip(arr, 0, 1))
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    grid = out / "heatmap_grid.png"
    fig.savefig(grid, dpi=80)
    files.append(grid)
    return files


_SPECIAL = ("<|startoftext|>", "<|endoftext|>", "[CLS]", "[SEP]", "[PAD]", "<s>", "</s>", "<pad>")


def words_from_token_strings(tokens: list[str]) -> list[tuple[str, list[int]]]:
    """Merge token strings into words: CLIP marks word ends with `</w>`, BERT continuations with `##`.

    Special tokens (BOS/EOS/padding) belong to no word.
    """
    words: list[tuple[str, list[int]]] = []
    open_word = False
    for i, tok in enumerate(tokens):
        if tok in _SPECIAL:
            open_word = False
            continue
        piece = tok.removeprefix("##").removesuffix("</w>").lstrip("\u0120\u2581")
        if (open_word or tok.startswith("##")) and words:
            word, idx = words[-1]
            words[-1] = (word + piece, [*idx, i])
        else:
            words.append((piece, [i]))
        open_word = not tok.endswith("</w>") and "</w>" in "".join(tokens)
    return words
