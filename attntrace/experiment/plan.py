"""The items of an experiment: every prompt (or edit group) x seed, or every text, in a fixed order."""

from __future__ import annotations

from dataclasses import dataclass

from .spec import Experiment

__all__ = ["Item", "plan_items"]


@dataclass
class Item:
    """One unit of work: a prompt (or text), or an edit group of prompts, with a seed."""

    id: str
    index: int
    prompt: str
    seed: int | None
    negative_prompt: str | None = None
    #: An edit group's prompts, source first (one batch sharing start latents); None for one prompt.
    group: tuple[str, ...] | None = None


def plan_items(exp: Experiment) -> list[Item]:
    """Every item of the experiment in a fixed order: prompt-major, then seed (texts: one item each)."""
    if exp.is_text_model:
        return [Item(f"t{i:03d}", i, text, None) for i, text in enumerate(exp.inputs.texts)]
    items = []
    for p, (spec, group) in enumerate(zip(exp.inputs.prompt_specs(), exp.inputs.prompt_groups())):
        for seed in spec.seeds or [0]:
            items.append(Item(f"p{p:03d}-s{seed}", len(items), spec.prompt, seed, spec.negative_prompt, group))
    return items
