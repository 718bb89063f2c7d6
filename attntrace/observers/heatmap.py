"""`heatmap`: per-token cross-attention maps for diffusion models, as running sums (two modes).

`mode: mean` (default). For every cross-attention call (and the image-query x text-key part of joint attention) the
probabilities are reduced over heads first (cheap), reshaped to the call's image grid and added into
a running sum kept at that grid's own size, on the model's device. The sums are upsampled
bilinearly to one common `resolution` only when the result is read: upsampling is linear, so this
equals upsampling every call's map (DAAM's order) and costs nothing per call.

Which tokens are text and image, and the image grid `(frames, h, w)`, come from the call's layout
(`call.layout`, resolved by the adapter): cross-attention, joint and single-stream blocks alike. Video
models get one map per frame (`result()["frames"]`, also saved) and the frame average (`result()["maps"]`),
in both modes. A call whose layout is unknown is skipped with one warning naming the site; a run that
saw no image tokens at all (a text model) warns at `save` (use `token_map` for token x token maps).

Memory: one float32 sum of shape (batch, text tokens, frames, h, w) per distinct image grid seen (a
UNet has 3-4 of them), plus a call counter each. It does not grow with the number of steps, layers
or heads; the per-call work is chunked over query rows (`max_chunk_mib`). Keeping one sum per grid
size is what lets `skip_lowest` drop the coarsest grid after the fact.

`mode: daam` aggregates as DAAM 0.2 (Tang et al., 2023) does: the cross-attention of every transformer
block of the down and up blocks (the mid block is left out), conditional half, one running sum over
steps per layer and head (heads are not averaged first); when read, each layer-and-head sum is
upsampled bicubically to the common grid (by default the largest grid seen: the latent for SD1.x/2.x,
64 for SDXL, as DAAM), clamped at 0 (bicubic undershoots), and averaged over layers and heads.
`word()` merges a word's tokens (every occurrence, all sub-tokens) by their mean, as DAAM's
`compute_word_heat_map`; `word(..., normalize=True)` first divides by the sum over the prompt's tokens
(DAAM's `normalize`). Memory: one float32 (batch, heads, text tokens, frames, h, w) sum per layer (for SD1.5
at 512 px, one image: about 65 MB), nothing per step.

Both modes restart their sums at each pipeline call (as DAAM does) unless `across_generations`, and
learn the prompts, tokenizer and output images of the call from the tracer, so words label the maps.

Why about 450 lines: the two aggregation modes share the call path, the params and the
result, and splitting them would put one observer's state in two files (word maps, labels and
rendering live in `wordmaps.py`, reading the sums (upsampling, video frames) in `heatsums.py`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ..core.call import AttentionCall
from ..core.errors import RunError
from ..core.observer import Observer, batch_rows
from ..core.words import special_positions
from .heatsums import frame_count, is_picture, split_frames, upsample
from .wordmaps import (
    WordMap,
    WordMaps,
    find_in_groups,
    find_word,
    grid_figure,
    render,
    to_rgb,
    word_maps,
    word_tokens,
    words_from_token_strings,
)

__all__ = ["Heatmap", "HeatmapParams", "WordMap", "WordMaps", "render", "word_maps", "word_tokens"]


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
    mode: Literal["mean", "daam"] = Field(
        default="mean",
        description="mean: head-mean maps, bilinear; daam: DAAM 0.2 (per-head sums, bicubic, clamp, no mid block)",
    )
    across_generations: bool = Field(
        default=False, description="keep summing across pipeline calls (default: each call starts afresh)"
    )


class Heatmap(Observer):
    """Running per-token attention maps: `result()["maps"]` is (batch, tokens, resolution, resolution).

    Mean mode keeps one (batch, tokens, frames, h, w) float32 sum per distinct image grid seen; DAAM mode
    one (batch, heads, tokens, frames, h, w) sum per layer. Nothing per step. `word("dog")` and `words()` give
    labelled maps for notebooks.
    """

    name = "heatmap"
    needs = frozenset({"probs"})
    needs_layout = True
    Params = HeatmapParams

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        # image-token count -> [sum (B, T, frames, h, w), calls added]   (mode: mean)
        self.sums: dict[int, list[Any]] = {}
        # site -> [sum (B, H, T, frames, h, w), calls added]              (mode: daam)
        self.head_sums: dict[str, list[Any]] = {}
        self._image: np.ndarray | None = None
        self._images: list[Any] = []
        self._words: list[tuple[str, list[int]]] | None = None
        self._prompts: dict[int | None, tuple[Any, str]] = {}  # item (None: every item) -> (tokenizer, prompt)
        self._generation: Any = None
        self._cache: tuple[int, dict[str, Any]] | None = None
        self._version = 0
        self._warned: set[str] = set()  # sites already warned about (once each)

    # -- generations -----------------------------------------------------------------------------
    def on_generation_start(self, generation: Any) -> None:
        """Learn the call's prompts and tokenizer; restart the sums unless `across_generations`."""
        if not self.params.across_generations:
            self.sums.clear()
            self.head_sums.clear()
            self._version += 1
        self._generation = generation
        self._images = []
        tokenizers = tuple(getattr(generation, "tokenizers", ()) or ())
        if tokenizers and tokenizers[0] is not None:
            self._prompts = {i: (tokenizers[0], p) for i, p in enumerate(generation.prompts)}

    def on_generation_end(self, generation: Any, images: Any | None) -> None:
        """Keep the output images to draw the maps on."""
        if images is None:
            return
        images = getattr(images, "images", images)
        batched = isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4
        if isinstance(images, (list, tuple)) or batched:
            # Latents (output_type="latent") are not pictures to draw on.
            self._images = [im if is_picture(im) else None for im in images]

    # -- collection ------------------------------------------------------------------------------
    def _warn(self, site: str, why: str) -> None:
        if site not in self._warned:
            self._warned.add(site)
            warnings.warn(f"attntrace: heatmap skips site {site!r}: {why}", RuntimeWarning, stacklevel=3)

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
        daam = self.params.mode == "daam"
        if daam and "mid_block" in call.site.split("."):
            return  # DAAM's locator leaves the mid block out
        rows = batch_rows(call, self.params.cond_half, strict=False)  # the rows the generation labels `cond`
        kept = rows.stop - rows.start
        heads = self.params.heads
        if heads is not None and any(i >= call.heads or i < -call.heads for i in heads):
            raise RunError(f"heatmap: heads {heads} out of range for {call.heads} heads at {call.site}")
        n_text = text.stop - text.start
        n_heads = len(heads) if heads is not None else call.heads
        # Image rows x text keys, filled chunk by chunk: (B', heads or 1, image tokens, text tokens).
        shape = (kept, n_heads if daam else 1, n_img, n_text)
        reduced = torch.empty(shape, dtype=torch.float32, device=call.query.device)
        budget = int(self.params.max_chunk_mib * 2**20)
        # Only the kept batch items are computed (half the work under classifier-free guidance).
        for qrows, chunk in call.iter_probs(budget, batch=rows):
            lo, hi = max(qrows.start, image.start), min(qrows.stop, image.stop)
            if lo >= hi:
                continue
            part = chunk[:, :, lo - qrows.start : hi - qrows.start, text]
            if heads is not None:
                part = part[:, heads]
            part = part.float()
            reduced[:, :, lo - image.start : hi - image.start] = part if daam else part.mean(dim=1, keepdim=True)
        maps = reduced.transpose(-1, -2).reshape(*shape[:2], n_text, frames, h, w)
        self._version += 1
        if daam:
            self._add(self.head_sums, call.site, maps, call)
        else:
            self._add(self.sums, n_img, maps[:, 0], call)

    @staticmethod
    def _add(store: dict[Any, list[Any]], key: Any, maps: torch.Tensor, call: AttentionCall) -> None:
        entry = store.get(key)
        if entry is None:
            store[key] = [maps.clone(), 1]
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
        """The image-token counts that contribute (after `skip_lowest` in mean mode)."""
        if self.params.mode == "daam":
            return sorted({int(np.prod(e[0].shape[-3:])) for e in self.head_sums.values()})
        levels = sorted(self.sums)
        if self.params.skip_lowest and len(levels) > 1:
            levels = levels[1:]
        return levels

    def result(self) -> dict[str, Any]:
        """`{"maps": (batch, tokens, R, R), "count": calls, "levels": grids, "mode": mode}`, and for video
        `"frames"`: (batch, tokens, frames, R, R), of which `maps` is the frame mean.

        Mean mode: the mean over contributing calls of head-mean probabilities (in [0, 1]). DAAM mode:
        DAAM's global heat map, the mean over layers and heads of each one's clamped bicubic step-sum.
        """
        if self._cache is not None and self._cache[0] == self._version:
            return self._cache[1]
        out = self._daam_result() if self.params.mode == "daam" else self._mean_result()
        out["mode"] = self.params.mode
        self._cache = (self._version, out)
        return out

    def _mean_result(self) -> dict[str, Any]:
        levels = self.levels()
        if not levels:
            return {"maps": None, "count": 0, "levels": []}
        res = self.params.resolution
        frame_count(self.sums[n][0] for n in levels)
        total = sum(upsample(self.sums[n][0], (res, res), "bilinear") for n in levels)
        count = sum(self.sums[n][1] for n in levels)
        return {**split_frames(total / count), "count": count, "levels": levels}

    def daam_size(self) -> tuple[int, int]:
        """DAAM mode's common grid: `resolution` when given, else the largest layer grid seen."""
        if "resolution" in self.params.model_fields_set:
            return self.params.resolution, self.params.resolution
        hw = max((tuple(e[0].shape[-2:]) for e in self.head_sums.values()), key=lambda t: t[0] * t[1])
        return int(hw[0]), int(hw[1])

    def _daam_result(self) -> dict[str, Any]:
        if not self.head_sums:
            return {"maps": None, "count": 0, "levels": []}
        size = self.daam_size()
        frame_count(e[0] for e in self.head_sums.values())
        total: torch.Tensor | None = None
        n_maps = 0
        for s, _ in self.head_sums.values():
            # Each (layer, head, frame) sum on its own: the clamp after bicubic upsampling is not linear.
            up = upsample(s, size, "bicubic").clamp_(min=0).sum(1)
            total = up if total is None else total + up
            n_maps += s.shape[1]
        assert total is not None
        count = sum(e[1] for e in self.head_sums.values())
        return {**split_frames(total / n_maps), "count": count, "levels": self.levels()}

    # -- labels ----------------------------------------------------------------------------------
    def set_image(self, image: Any, item: int | None = None) -> None:
        """The generated image (PIL image, HxWx3 array or CHW tensor) to draw maps on (all items, or `item`)."""
        if item is None:
            self._image = to_rgb(image)
        else:
            while len(self._images) <= item:
                self._images.append(None)
            self._images[item] = image

    def set_prompt(self, tokenizer: Any, prompt: str, item: int | None = None) -> None:
        """Name the maps by the prompt's words (sub-tokens merged), for every item or one `item`."""
        self._prompts[item] = (tokenizer, prompt)
        if item is None or item == 0:
            self._words = word_tokens(tokenizer, prompt)

    def set_context(self, prompt: str | None = None, tokens: list[str] | None = None, **_: Any) -> None:
        """Name the maps from the token strings the text encoder saw (the experiment runner calls this)."""
        if tokens:
            self._words = words_from_token_strings(tokens)

    def _image_of(self, item: int) -> Any:
        if item < len(self._images) and self._images[item] is not None:
            return self._images[item]
        return self._image

    def _prompt_of(self, item: int) -> tuple[Any, str] | None:
        return self._prompts.get(item) or self._prompts.get(None)

    def _groups(self, item: int, n_tokens: int) -> list[tuple[str, list[int]]]:
        """The words of `item`'s prompt and their token positions (special tokens in none)."""
        known = self._prompt_of(item)
        if known is not None:
            groups = word_tokens(*known)
        elif self._words is not None:
            groups = self._words
        else:
            groups = [(f"token {i}", [i]) for i in range(n_tokens)]
        return [(w, idx) for w, idx in groups if idx and max(idx) < n_tokens]

    def _item_maps(self, item: int) -> torch.Tensor:
        maps = self.result()["maps"]
        if maps is None:
            raise RunError("heatmap: no maps yet (no cross-attention call was traced)")
        if not 0 <= item < maps.shape[0]:
            raise RunError(f"heatmap: item {item} is outside the {maps.shape[0]} image(s) traced")
        return maps[item]

    def _merge_fn(self, maps: torch.Tensor, idx: Sequence[int]) -> torch.Tensor:
        # DAAM averages a word's tokens; mean mode adds them (the word's share of attention).
        part = maps[list(idx)]
        return part.mean(0) if self.params.mode == "daam" else part.sum(0)

    def _normalized(self, maps: torch.Tensor, item: int, groups: list[tuple[str, list[int]]]) -> torch.Tensor:
        # DAAM's normalize: divide by the sum over the prompt's own tokens (start, end, padding left out).
        known = self._prompt_of(item)
        if known is not None:
            special = special_positions(*known)
            tokens = [i for i in range(maps.shape[0]) if i not in special]
        else:
            tokens = sorted({i for _, idx in groups for i in idx})
        return maps / (maps[tokens].sum(0, keepdim=True) + 1e-6)

    def word(self, word: str, item: int = 0, *, normalize: bool = False) -> WordMap:
        """The map of `word` (or phrase; `dog#2`: second occurrence) in image `item`'s prompt.

        Every token of the word is merged (all occurrences unless `#n`). With `normalize`, maps are
        first divided by their sum over the prompt's tokens (DAAM's `normalize=True`).
        """
        maps = self._item_maps(item)
        known = self._prompt_of(item)
        groups = self._groups(item, maps.shape[0])
        if known is not None:
            positions = find_word(known[0], known[1], word)
        else:
            positions = find_in_groups(groups, word)
        if normalize:
            maps = self._normalized(maps, item, groups)
        return WordMap(word, self._merge_fn(maps, positions), positions, item,
                       known[1] if known else None, self._image_of(item))  # fmt: skip

    def words(self, item: int = 0, *, normalize: bool = False) -> WordMaps:
        """Every word of image `item`'s prompt (special and padding tokens left out), as a grid."""
        maps = self._item_maps(item)
        groups = self._groups(item, maps.shape[0])
        if normalize:
            maps = self._normalized(maps, item, groups)
        known = self._prompt_of(item)
        prompt = known[1] if known else None
        image = self._image_of(item)
        return WordMaps([WordMap(w, self._merge_fn(maps, idx), idx, item, prompt, image) for w, idx in groups],
                        image=image, prompt=prompt)  # fmt: skip

    def grid(self, *, alpha: float = 0.5, cols: int = 6) -> Any:
        """A matplotlib Figure with every image of the batch, each followed by its word maps."""
        maps = self.result()["maps"]
        if maps is None:
            raise RunError("heatmap: no maps yet (no cross-attention call was traced)")
        return grid_figure([self.words(i) for i in range(maps.shape[0])], alpha=alpha, cols=cols)

    def _repr_png_(self) -> bytes | None:
        if self.result()["maps"] is None:
            return None
        import io

        buf = io.BytesIO()
        self.grid().savefig(buf, format="png", dpi=80)
        return buf.getvalue()

    def _repr_html_(self) -> str | None:
        png = self._repr_png_()
        if png is None:
            return None
        import base64

        return f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}"/>'

    def save(self, directory: Path) -> list[Path]:
        """`heatmap.safetensors` (maps, count; video: frames) and, for every image, per-word overlays and a grid.

        Image 0's overlays are `heatmap_NN_word.png`, image i's `item{i}_heatmap_NN_word.png`;
        `heatmap_grid.png` shows all images one below another (source and edited prompts together).
        """
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
        save_file(tensors, str(path), metadata={"levels": ",".join(map(str, res["levels"])), "mode": res["mode"]})
        files = [path]
        grey = np.full((256, 256, 3), 0.5, dtype=np.float32)
        rows = []
        for item in range(maps.shape[0]):
            words = self.words(item)
            image = words.image if words.image is not None else grey
            prefix = "" if item == 0 else f"item{item}_"
            stack = torch.stack([m.value for m in words]) if len(words) else maps[item][:0]
            files += render(image, stack, words.words, directory, prefix=prefix, grid=False)
            rows.append(WordMaps(list(words), image=image, prompt=words.prompt))
        grid = directory / "heatmap_grid.png"
        grid_figure(rows).savefig(grid, dpi=80)
        files.append(grid)
        return files

    def reset(self) -> None:
        """Forget the maps, images and the generation seen (prompts set by `set_prompt` stay)."""
        self.sums.clear()
        self.head_sums.clear()
        self._cache = None
        self._images = []
        self._generation = None
        self._version += 1

    def close(self) -> None:
        self.sums.clear()
        self.head_sums.clear()
        self._cache = None
        self._image = None  # the generated image handed over by set_image
        self._images = []
        self._generation = None

