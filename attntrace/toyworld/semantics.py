"""Measurements that say whether attention maps and edits mean what they claim, on the toy world.

Each function measures one property on a pipeline and returns plain numbers; the semantic tests
(`tests/toyworld/`) assert the trained model passes and a random-weight twin fails, and
`benchmarks/toyworld_semantics.py` records the values the thresholds were set from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..observers.ablate import Ablate
from ..observers.reweight import Reweight
from .probe import (
    colour_share,
    localisation,
    object_masks,
    shared_latents,
    traced_generation,
    word_positions,
)
from .segment import contains, find_objects
from .train import held_out_scenes
from .world import parse_prompt

__all__ = [
    "SWAPS",
    "heldout_prompts",
    "measure_ablation",
    "measure_localisation",
    "measure_reweight",
    "measure_swap",
]

STEPS = 20  # denoising steps for the checks (as the model was evaluated)
GUIDANCE = 5.0
# Word swaps (source, target): a colour swap and a shape swap, on held-out and trained layouts.
SWAPS: tuple[tuple[str, str], ...] = (
    ("a red circle left of a yellow square", "a blue circle left of a yellow square"),
    ("a green triangle above a red cross", "a green triangle above a blue cross"),
    ("a blue square right of a yellow circle", "a blue square right of a yellow triangle"),
    ("a yellow cross left of a green circle", "a red cross left of a green circle"),
)


def heldout_prompts(n: int = 12) -> list[str]:
    """`n` fixed two- and three-object captions that were never rendered for training."""
    return [sc.caption for sc in held_out_scenes(n, seed=7)]


@dataclass
class LocalisationReport:
    """Pointing/mIoU of the conditional maps, the unconditional maps, and the maps one token off."""

    cond_pointing: float
    cond_miou: float
    uncond_pointing: float
    uncond_miou: float
    next_token_pointing: float
    prev_token_pointing: float
    n: int
    masks: list[dict[str, np.ndarray]]
    images: np.ndarray
    maps: torch.Tensor  # (2 x prompts: unconditional rows then conditional, tokens, R, R)


def measure_localisation(
    pipe: Any,
    prompts: list[str],
    *,
    masks: list[dict[str, np.ndarray]] | None = None,
    seed: int = 0,
    steps: int = STEPS,
) -> LocalisationReport:
    """Shape words' maps against the generated objects' masks (or the `masks` given).

    The random-weight twin draws no objects, so it is scored against the trained model's masks
    (same prompts, same seed).
    """
    tr = traced_generation(pipe, prompts, seed=seed, steps=steps, guidance=GUIDANCE, heatmap={"cond_half": False})
    assert tr.maps is not None
    n = len(prompts)
    if masks is None:
        masks = [object_masks(img, p) for img, p in zip(tr.images, prompts)]
    cond = slice(n, 2 * n)  # the pipeline's CFG batch is [uncond..., cond...]
    c = localisation(tr.maps, prompts, masks, tr.tokenizer, rows=cond)
    u = localisation(tr.maps, prompts, masks, tr.tokenizer, rows=slice(0, n))
    nxt = localisation(tr.maps, prompts, masks, tr.tokenizer, rows=cond, shift=1)
    prv = localisation(tr.maps, prompts, masks, tr.tokenizer, rows=cond, shift=-1)
    return LocalisationReport(
        c.pointing, c.miou, u.pointing, u.miou, nxt.pointing, prv.pointing, c.n, masks, tr.images, tr.maps
    )


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def measure_swap(
    pipe: Any, swaps: tuple[tuple[str, str], ...] = SWAPS, *, seed: int = 0, steps: int = STEPS
) -> dict[str, Any]:
    """For each word swap: IoU of every object's mask in the edited image with the source's, with and
    without prompt-to-prompt, and whether the edited image shows the target prompt's objects.

    `colour_changed` scores the colour swaps alone by colour segmentation, shapes aside: the edited
    image holds the target colour and no longer the source's. `shape_changed` scores the shape swaps:
    the edited image holds the target (colour, shape) pairs.
    """
    from .edits import word_swap

    ious, plain_ious, changed = [], [], []
    colour_changed, shape_changed = [], []
    for source, target in swaps:
        im = word_swap(pipe, source, target, seed=seed, steps=steps, guidance=GUIDANCE)
        src = find_objects(im["source"])
        for key, out in (("edited", ious), ("target", plain_ious)):
            found = find_objects(im[key])
            # object k of the source prompt against object k of the target prompt, found by colour
            for (sc, _), (tc, _) in zip(parse_prompt(source), parse_prompt(target)):
                s_obj = next((f for f in src if f.colour == sc), None)
                t_obj = next((f for f in found if f.colour == tc), None)
                out.append(0.0 if s_obj is None or t_obj is None else _mask_iou(s_obj.mask, t_obj.mask))
        changed.append(contains(im["edited"], parse_prompt(target)))
        pairs = [(a, b) for a, b in zip(parse_prompt(source), parse_prompt(target)) if a != b]
        drawn = {f.colour for f in find_objects(im["edited"])}
        for (sc, _), (tc, _) in pairs:
            if sc != tc:
                colour_changed.append(tc in drawn and sc not in drawn)
            else:
                shape_changed.append(changed[-1])
    return {
        "min_iou": float(min(ious)),
        "mean_iou": float(np.mean(ious)),
        "mean_iou_without_p2p": float(np.mean(plain_ious)),
        "changed": float(np.mean(changed)),
        "colour_changed": float(np.mean(colour_changed)) if colour_changed else float("nan"),
        "shape_changed": float(np.mean(shape_changed)) if shape_changed else float("nan"),
        "ious": ious,
    }


def measure_reweight(
    pipe: Any, prompts: list[str], factor: float = 2.0, *, seed: int = 0, steps: int = STEPS
) -> dict[str, Any]:
    """Pixel share of each prompt's first colour, plain and with that colour word's attention x`factor`.

    The prompts must put their first colour word at the same token position (they share one edit).
    """
    tok = pipe.tokenizer
    colours = [parse_prompt(p)[0][0] for p in prompts]
    positions = {tuple(word_positions(tok, p, c)) for p, c in zip(prompts, colours)}
    if len(positions) != 1:
        raise ValueError(f"the colour words sit at different token positions: {positions}")
    tokens = list(next(iter(positions)))
    base = traced_generation(pipe, prompts, seed=seed, steps=steps, guidance=GUIDANCE, heatmap=False)
    edit = Reweight({"tokens": tokens, "factor": factor})
    up = traced_generation(
        pipe, prompts, seed=seed, steps=steps, guidance=GUIDANCE, heatmap=False, extra=[(edit, "*attn2", "cross")],
        group=False,  # each prompt scales its own maps (not P2P's equaliser over a source prompt's maps)
    )
    before = [colour_share(im, c) for im, c in zip(base.images, colours)]
    after = [colour_share(im, c) for im, c in zip(up.images, colours)]
    return {
        "before": before,
        "after": after,
        "mean_ratio": float(np.mean(after) / max(np.mean(before), 1e-6)),
        "raised": float(np.mean([a > b for a, b in zip(after, before)])),
    }


def measure_ablation(pipe: Any, prompts: list[str], *, seed: int = 0, steps: int = STEPS) -> dict[str, Any]:
    """Prompt following with and without every cross-attention head zeroed, from one shared noise.

    With every head ablated, the text can no longer reach the UNet: all prompts give one image.
    """
    latents = shared_latents(pipe, len(prompts), seed)
    heads = pipe.unet.config.attention_head_dim
    heads = list(range(heads if isinstance(heads, int) else max(heads)))
    plain = traced_generation(pipe, prompts, steps=steps, guidance=GUIDANCE, latents=latents, heatmap=False)
    ablate = Ablate({"heads": heads})
    cut = traced_generation(
        pipe,
        prompts,
        steps=steps,
        guidance=GUIDANCE,
        latents=latents,
        heatmap=False,
        extra=[(ablate, "*attn2", "cross")],
    )

    def follow(images: np.ndarray) -> float:
        return float(np.mean([contains(im, parse_prompt(p)) for im, p in zip(images, prompts)]))

    def colours(images: np.ndarray) -> float:  # every named colour drawn (>= 10 pixels), shapes aside
        return float(
            np.mean([all(colour_share(im, c) * im.shape[0] * im.shape[1] >= 10 for c, _ in parse_prompt(p))
                     for im, p in zip(images, prompts)])
        )  # fmt: skip

    spread = float(torch.from_numpy(cut.images - cut.images[:1]).abs().max())
    return {
        "following": follow(plain.images),
        "following_ablated": follow(cut.images),
        "colours": colours(plain.images),
        "colours_ablated": colours(cut.images),
        "max_difference_between_prompts_ablated": spread,
        "max_difference_between_prompts": float(torch.from_numpy(plain.images - plain.images[:1]).abs().max()),
    }
