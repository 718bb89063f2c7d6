"""Score heat maps against the toy world's ground truth: pointing game and top-region IoU.

`traced_generation` runs the pipeline under a tracer with a `heatmap` observer (and any extra
observers, e.g. editors) and returns the images with the per-token maps; `object_masks` finds where
the generated image put each named object (colour segmentation); `localisation` checks, for every
shape word, whether its map peaks inside that object's mask (pointing game) and how well the map's
top region overlaps the mask (IoU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..core.observer import Observer
from ..core.words import resolve_words
from ..observers.heatmap import Heatmap
from .model import call_kwargs, denoiser
from .segment import colour_masks, find_objects
from .world import SHAPES, parse_prompt

__all__ = [
    "Localisation",
    "Traced",
    "colour_share",
    "localisation",
    "object_masks",
    "pointing_hit",
    "shared_latents",
    "top_iou",
    "traced_generation",
    "word_positions",
]

TOP_THRESHOLD = 0.4  # a map's top region: at least 40% of the way from its minimum to its maximum


@dataclass
class Traced:
    """One traced batch: prompts, images (N, H, W, 3) in [0, 1] and maps (rows, tokens, R, R)."""

    prompts: list[str]
    images: np.ndarray
    maps: torch.Tensor | None
    tokenizer: Any = field(repr=False)


def shared_latents(pipe: Any, n: int, seed: int) -> torch.Tensor:
    """One seeded starting noise repeated for `n` images (what prompt-to-prompt edits need)."""
    config = denoiser(pipe).config
    gen = torch.Generator().manual_seed(seed)
    one = torch.randn((1, config.in_channels, config.sample_size, config.sample_size), generator=gen)
    return one.expand(n, -1, -1, -1).clone()


def traced_generation(
    pipe: Any,
    prompts: list[str],
    *,
    seed: int = 0,
    steps: int = 20,
    guidance: float = 5.0,
    latents: torch.Tensor | None = None,
    heatmap: dict[str, Any] | bool = True,
    match: str | None = None,
    extra: list[tuple[Observer, str, str | None]] | None = None,
    group: bool | None = None,
) -> Traced:
    """Generate `prompts` in one batch with a `heatmap` on `match` (plus `extra` (observer, match, kind)).

    `match` defaults to every cross-attention site of a UNet (`*attn2`) and every joint-attention
    site of a transformer (`*`; the heat map reads their image-query x text-key part).

    `heatmap` is True (defaults: maps at image resolution), False (no maps) or the observer's params.
    `group` True/False forces the prompts to be (or not be) one prompt-to-prompt edit group; None lets the
    tracer decide (a group when a group editor such as `replace` is attached).
    """
    from ..tracer import Tracer

    tracer = Tracer({"rules": []})
    hm = None
    unet = getattr(pipe, "unet", None) is not None
    if heatmap is not False:
        params = {"resolution": denoiser(pipe).config.sample_size * pipe.vae_scale_factor}
        params.update(heatmap if isinstance(heatmap, dict) else {})
        if unet:
            hm = tracer.add(Heatmap(params), match=match or "*attn2", kind="cross")
        else:
            hm = tracer.add(Heatmap(params), match=match or "*", kind="joint")
    for obs, m, kind in extra or []:
        tracer.add(obs, match=m, kind=kind)
    gen = torch.Generator().manual_seed(seed)
    kwargs = {"num_inference_steps": steps, "guidance_scale": guidance, "generator": gen, "latents": latents}
    kwargs.update(call_kwargs(pipe))
    with torch.no_grad():
        if tracer.observers:
            with tracer.attach(pipe):
                if group is None:
                    out = pipe(prompts, output_type="np", **kwargs)
                else:
                    with tracer.edit_group(group):
                        out = pipe(prompts, output_type="np", **kwargs)
        else:
            out = pipe(prompts, output_type="np", **kwargs)
    maps = hm.result()["maps"] if hm is not None else None
    tracer.close()
    return Traced(list(prompts), out.images, maps, pipe.tokenizer)


def word_positions(tokenizer: Any, prompt: str, word: str) -> list[int]:
    """Token positions of `word` in `prompt` (as the text encoder sees them; `WordError` if absent)."""
    return resolve_words(tokenizer, prompt, [word])[0]


def object_masks(image: np.ndarray, prompt: str, *, same_shape: bool = False) -> dict[str, np.ndarray]:
    """shape word -> mask of the generated object: the region in the colour the prompt gives it.

    Objects are found by colour (each prompt names distinct colours); `same_shape` also requires the
    region to have the named shape. Named objects the image does not hold are left out.
    """
    found = {f.colour: f for f in find_objects(image)}
    out = {}
    for colour, shape in parse_prompt(prompt):
        f = found.get(colour)
        if f is not None and (f.shape == shape or not same_shape):
            out[shape] = f.mask
    return out


def _up(m: torch.Tensor, size: int) -> np.ndarray:
    m = m.float()
    if m.shape[-1] != size:
        m = F.interpolate(m[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    return m.numpy()


def pointing_hit(heat: torch.Tensor, mask: np.ndarray) -> bool:
    """Pointing game: the map's maximum (at the mask's resolution) lies inside the mask."""
    m = _up(heat, mask.shape[0])
    return bool(mask.flat[int(np.argmax(m))])


def top_iou(heat: torch.Tensor, mask: np.ndarray, threshold: float = TOP_THRESHOLD) -> float:
    """IoU of the map's top region (min-max normalised map ≥ `threshold`) with the mask."""
    m = _up(heat, mask.shape[0])
    lo, hi = float(m.min()), float(m.max())
    top = (m - lo) >= threshold * (hi - lo) if hi > lo else np.zeros_like(mask)
    return float((top & mask).sum() / max((top | mask).sum(), 1))


@dataclass
class Localisation:
    """Pointing accuracy and mean top-region IoU over the scored (image, shape word) pairs."""

    pointing: float
    miou: float
    n: int
    hits: list[bool] = field(repr=False)


def localisation(
    maps: torch.Tensor,
    prompts: list[str],
    masks: list[dict[str, np.ndarray]],
    tokenizer: Any,
    *,
    rows: slice | None = None,
    shift: int = 0,
) -> Localisation:
    """Score each shape word's map (token positions + `shift`) against its object's mask.

    `maps` is (rows, tokens, R, R); `rows` picks the rows of the prompts (default: the first ones).
    Words whose object the image does not hold are not scored.
    """
    sel = maps if rows is None else maps[rows]
    hits, ious = [], []
    for i, (prompt, mk) in enumerate(zip(prompts, masks)):
        for shape, mask in mk.items():
            idx = [p + shift for p in word_positions(tokenizer, prompt, shape)]
            heat = sel[i, idx].sum(0)
            hits.append(pointing_hit(heat, mask))
            ious.append(top_iou(heat, mask))
    n = len(hits)
    return Localisation(float(np.mean(hits)) if n else 0.0, float(np.mean(ious)) if n else 0.0, n, hits)


def colour_share(image: np.ndarray, colour: str) -> float:
    """Fraction of the image's pixels segmented as `colour`."""
    return float(colour_masks(image)[colour].mean())


def shape_words() -> tuple[str, ...]:
    return SHAPES
