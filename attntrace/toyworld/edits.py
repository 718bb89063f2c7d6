"""Prompt-to-prompt on the toy world: a word swap that keeps the layout, and its picture.

The swap is generated as one two-prompt batch from one shared starting noise; the `replace` editor
gives the edited prompt the source prompt's cross-attention maps for the first `cross_fraction` of the
steps (and its self-attention maps for the first `self_fraction`), which is what keeps the objects
where they were while the swapped word changes what is drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..observers.replace import Replace
from .probe import shared_latents, traced_generation
from .world import check_prompt

__all__ = ["save_swap_figure", "word_swap"]


def word_swap(
    pipe: Any,
    source: str,
    target: str,
    *,
    seed: int = 0,
    steps: int = 20,
    guidance: float = 5.0,
    cross_fraction: float = 0.8,
    self_fraction: float = 0.4,
) -> dict[str, np.ndarray]:
    """Images (H, W, 3) of `source`, of `target` from the same noise, and of `target` edited with P2P."""
    for p in (source, target):
        check_prompt(p)
    latents = shared_latents(pipe, 2, seed)
    plain = traced_generation(pipe, [source, target], steps=steps, guidance=guidance, latents=latents, heatmap=False)
    editor = Replace(
        {
            "cfg": True,  # the pipeline's batch is [uncond x2, cond x2]; each half keeps its own source
            "source": 0,
            "cross_until_step": round(cross_fraction * steps),
            "self_until_step": round(self_fraction * steps),
        }
    )
    edited = traced_generation(
        pipe,
        [source, target],
        steps=steps,
        guidance=guidance,
        latents=latents,
        heatmap=False,
        extra=[(editor, "*", None)],
    )
    return {"source": edited.images[0], "target": plain.images[1], "edited": edited.images[1]}


def save_swap_figure(images: dict[str, np.ndarray], source: str, target: str, path: str | Path) -> Path:
    """A three-panel PNG: source, target from the same noise, target with prompt-to-prompt."""
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    panels = [
        (f"source\n{source}", images["source"]),
        (f"target, same noise\n{target}", images["target"]),
        ("target, prompt-to-prompt\n(source's attention maps)", images["edited"]),
    ]
    fig = Figure(figsize=(9.0, 3.6))
    for k, (title, img) in enumerate(panels):
        ax = fig.add_subplot(1, 3, k + 1)
        ax.imshow(np.clip(img, 0, 1), interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return path
