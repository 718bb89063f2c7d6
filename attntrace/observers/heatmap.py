"""`heatmap`: per-token cross-attention maps for diffusion models (DAAM-style), as a running sum.

For every cross-attention call (and the image-query x text-key part of joint attention) the
probabilities are reduced over heads first (cheap), reshaped to the call's image grid and added into
a running sum kept at that grid's own size, on the model's device. The sums are upsampled
bilinearly to one common `resolution` only when the result is read: upsampling is linear, so this
equals upsampling every call's map (DAAM's order) and costs nothing per call.

Which tokens are text and image, and the image grid `(frames, h, w)`, come from the call's layout
(`call.layout`, resolved by the adapter): cross-attention, joint and single-stream blocks alike. Video
models get one map per frame (`result()["frames"]`) and the frame average (`result()["maps"]`). A call
whose layout is unknown is skipped with one warning naming the site; a run that saw no image tokens at
all (a text model) warns at `save` (use `token_map` for token x token maps).

Memory: one float32 sum of shape (batch, text tokens, frames, h, w) per distinct image grid seen (a
UNet has 3-4 of them), plus a call counter each. It does not grow with the number of steps, layers
or heads; the per-call work is chunked over query rows (`max_chunk_mib`). Keeping one sum per grid
size is what lets `skip_lowest` drop the coarsest grid after the fact.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..core.call import AttentionCall
from ..core.errors import RunError
from ..core.observer import Observer

__all__ = ["Heatmap", "HeatmapParams", "render", "word_maps", "word_tokens"]


class HeatmapParams(BaseModel):
    """Parameters of `heatmap`."""

    model_config = ConfigDict(extra="forbid")
    resolution: int = Field(default=64, ge=1, le=4096, description="side of the common map grid")
    cond_half: bool = Field(
        default=True,
        description="keep only the second (conditional) half of an even batch (classifier-free guidance)",
    )
    heads: list[int] | None = Field(default=None, description="heads to average (default: all)")
    skip_lowest: bool = Field(
        default=True, description="leave out the coarsest image grid seen (when more than one grid was seen)"
    )
    min_tokens: int = Field(default=0, ge=0, description="ignore calls with fewer image tokens than this")
    max_chunk_mib: float = Field(default=64.0, gt=0, description="peak size of one probability chunk")


class Heatmap(Observer):
    """Running per-token attention maps: `result()["maps"]` is (batch, tokens, resolution, resolution).

    Keeps one (batch, tokens, h, w) float32 sum per distinct image grid (h, w) seen; nothing per step.
    """

    name = "heatmap"
    needs = frozenset({"probs"})
    needs_layout = True
    Params = HeatmapParams

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        # image-token count -> [sum (B, T, R, R), calls added]
        self.sums: dict[int, list[Any]] = {}
        self._image: np.ndarray | None = None
        self._words: list[tuple[str, list[int]]] | None = None
        self._warned: set[str] = set()

    def _warn(self, site: str, why: str) -> None:
        if site not in self._warned:
            self._warned.add(site)
            warnings.warn(f"attntrace: heatmap skips site {site!r}: {why}", RuntimeWarning, stacklevel=3)

    # -- collection ------------------------------------------------------------------------------
    def on_call(self, call: AttentionCall) -> None:
        layout = call.layout
        if layout.kind not in ("cross", "joint"):
            return
        if not layout.known:
            self._warn(call.site, f"its token layout is unknown ({layout.note})")
            return
        text, image, grid = layout.text, layout.image, layout.grid
        if text is None or image is None:
            return  # no text keys in this call (an image-context call of a cross-attention layer)
        n_img = image.stop - image.start
        if grid is None or grid[0] * grid[1] * grid[2] != n_img:
            self._warn(call.site, f"the grid of its {n_img} image tokens is unknown")
            return
        frames, h, w = grid
        if n_img < self.params.min_tokens:
            return
        batch = call.query.shape[0]
        b0 = batch // 2 if (self.params.cond_half and batch >= 2 and batch % 2 == 0) else 0
        heads = self.params.heads
        if heads is not None and any(i >= call.heads or i < -call.heads for i in heads):
            raise RunError(f"heatmap: heads {heads} out of range for {call.heads} heads at {call.site}")
        n_text = text.stop - text.start
        # Head-mean of the image rows x text keys, filled chunk by chunk: (B', image tokens, text tokens).
        reduced = torch.empty(batch - b0, n_img, n_text, dtype=torch.float32, device=call.query.device)
        budget = int(self.params.max_chunk_mib * 2**20)
        # Only the kept batch items are computed (half the work under classifier-free guidance).
        for rows, chunk in call.iter_probs(budget, batch=slice(b0, batch)):
            lo, hi = max(rows.start, image.start), min(rows.stop, image.stop)
            if lo >= hi:
                continue
            part = chunk[:, :, lo - rows.start : hi - rows.start, text]
            if heads is not None:
                part = part[:, heads]
            reduced[:, lo - image.start : hi - image.start] = part.float().mean(dim=1)
        maps = reduced.transpose(1, 2).reshape(batch - b0, n_text, frames, h, w)
        entry = self.sums.get(n_img)
        if entry is None:
            self.sums[n_img] = [maps.clone(), 1]
            return
        if entry[0].shape != maps.shape:
            raise RunError(
                f"heatmap: map shape changed from {tuple(entry[0].shape)} to {tuple(maps.shape)} "
                f"at {call.site} "
                "(batch size or prompt length changed); use one heatmap per run"
            )
        entry[0].add_(maps.to(entry[0].device))
        entry[1] += 1

    # -- results ---------------------------------------------------------------------------------
    def levels(self) -> list[int]:
        """The image-token counts that contribute (after `skip_lowest`)."""
        levels = sorted(self.sums)
        if self.params.skip_lowest and len(levels) > 1:
            levels = levels[1:]
        return levels

    def result(self) -> dict[str, Any]:
        """`{"maps": mean map per (batch, token) over contributing calls, "count": calls, "levels": grids}`,
        and for video (`frames` > 1) `"frames"`: (batch, token, frames, R, R); `maps` is their frame mean.

        Each call's map is a head mean of probabilities, so `maps` stays in [0, 1].
        """
        levels = self.levels()
        if not levels:
            return {"maps": None, "count": 0, "levels": []}
        res = self.params.resolution
        frames = {self.sums[n][0].shape[2] for n in levels}
        if len(frames) > 1:
            raise RunError(f"heatmap: grids with different frame counts {sorted(frames)}; use one heatmap per run")
        total = sum(_upsample(self.sums[n][0], res) for n in levels)
        count = sum(self.sums[n][1] for n in levels)
        per_frame = total / count
        out = {"maps": per_frame.mean(dim=2), "count": count, "levels": levels}
        if per_frame.shape[2] > 1:
            out["frames"] = per_frame
        return out

    def set_image(self, image: Any) -> None:
        """The generated image (PIL image, HxWx3 array or CHW tensor in [0,1] or [0,255]) to draw maps on."""
        self._image = _to_rgb(image)

    def set_prompt(self, tokenizer: Any, prompt: str) -> None:
        """Name the maps by the prompt's words (sub-tokens merged)."""
        self._words = word_tokens(tokenizer, prompt)

    def set_context(self, prompt: str | None = None, tokens: list[str] | None = None, **_: Any) -> None:
        """Name the maps from the token strings the text encoder saw (the experiment runner calls this)."""
        if tokens:
            self._words = words_from_token_strings(tokens)

    def save(self, directory: Path) -> list[Path]:
        from safetensors.torch import save_file

        res = self.result()
        if res["maps"] is None:
            warnings.warn(
                "attntrace: heatmap has nothing to save: no traced call had text keys and an image grid "
                "(a text model? use `token_map` for token x token maps)",
                RuntimeWarning,
                stacklevel=2,
            )
            return []
        directory.mkdir(parents=True, exist_ok=True)
        maps = res["maps"].detach().float().cpu().contiguous()
        path = directory / "heatmap.safetensors"
        tensors = {"maps": maps, "count": torch.tensor(res["count"])}
        if "frames" in res:
            tensors["frames"] = res["frames"].detach().float().cpu().contiguous()
        save_file(tensors, str(path), metadata={"levels": ",".join(map(str, res["levels"]))})
        files = [path]
        if self._words is not None:
            words = [w for w, idx in self._words if max(idx) < maps.shape[1]]
            item = _merge(maps[0], [idx for _, idx in self._words if max(idx) < maps.shape[1]])
        else:
            words = [f"token {i}" for i in range(maps.shape[1])]
            item = maps[0]
        image = self._image if self._image is not None else np.full((256, 256, 3), 0.5, dtype=np.float32)
        files += render(image, item, words, directory)
        return files

    def close(self) -> None:
        self.sums.clear()
        self._image = None  # the generated image handed over by set_image


def _upsample(sums: torch.Tensor, res: int) -> torch.Tensor:
    """(B, T, frames, h, w) sums -> (B, T, frames, res, res), bilinear per frame."""
    b, t, f, h, w = sums.shape
    up = F.interpolate(sums.reshape(b, t * f, h, w), size=(res, res), mode="bilinear", align_corners=False)
    return up.reshape(b, t, f, res, res)


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
def _to_rgb(image: Any) -> np.ndarray:
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
) -> list[Path]:
    """Write one overlay PNG per word and `heatmap_grid.png`; `maps` is (W, R, R) for one image."""
    import matplotlib
    import matplotlib.image as mpimg
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rgb = _to_rgb(image)
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
        path = out / f"heatmap_{i:02d}_{_safe(word)}.png"
        mpimg.imsave(path, np.clip(blend, 0, 1))
        files.append(path)
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
