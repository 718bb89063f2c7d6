"""`replace`: prompt-to-prompt attention injection from a source batch item.

Cross-attention (`replace` mode): every other batch item gets the source item's probabilities for
steps before `cross_until_step`; `refine` mode takes, for each target token `j`, the source's map of
token `mapper[j]` (`-1` keeps the item's own map). Self-attention: the source's maps are injected for
steps before `self_until_step`. With `cfg: true` the batch is [uncond..., cond...] and each half is
handled alone (its own source at position `source` within the half). Joint attention is left alone
(its rows mix image and text; no published recipe). The attention is computed once per call.

Memory: nothing kept between calls.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..core.call import AttentionCall
from ..core.errors import EditError
from ..core.observer import Observer

__all__ = ["Replace", "ReplaceParams", "batch_groups"]


def batch_groups(batch: int, cfg: bool) -> list[range]:
    """The independent groups of a batch: the whole batch, or its two CFG halves."""
    if not cfg:
        return [range(batch)]
    if batch % 2:
        raise EditError(f"cfg: true needs an even batch ([uncond..., cond...]), got batch {batch}")
    half = batch // 2
    return [range(0, half), range(half, batch)]


class ReplaceParams(BaseModel):
    """Parameters of `replace`."""

    model_config = ConfigDict(extra="forbid")
    source: int = Field(default=0, ge=0, description="batch item (within each group) whose maps are injected")
    mode: Literal["replace", "refine"] = "replace"
    mapper: list[int] | None = Field(default=None, description="refine: target -> source token; -1 keeps own")
    cross_until_step: int | None = Field(default=None, ge=0, description="inject cross maps at steps < this")
    steps_fraction: float | None = Field(default=None, ge=0, le=1, description="or: fraction of total_steps")
    total_steps: int | None = Field(default=None, ge=1)
    self_until_step: int = Field(default=0, ge=0, description="inject self-attention maps at steps < this")
    cfg: bool = Field(default=False, description="batch is [uncond..., cond...]; treat each half alone")

    @model_validator(mode="after")
    def _check(self) -> ReplaceParams:
        if self.steps_fraction is not None:
            if self.total_steps is None:
                raise ValueError("steps_fraction needs total_steps")
            if self.cross_until_step is not None:
                raise ValueError("give cross_until_step or steps_fraction, not both")
        if self.mode == "refine" and self.mapper is None:
            raise ValueError("mode 'refine' needs mapper (target token -> source token)")
        return self

    def cross_limit(self) -> int | None:
        """Steps < this get cross maps injected (None: every step)."""
        if self.steps_fraction is not None:
            assert self.total_steps is not None
            return int(self.steps_fraction * self.total_steps)
        return self.cross_until_step


class Replace(Observer):
    """Prompt-to-prompt replace/refine of cross maps and self-map injection. Keeps nothing."""

    name = "replace"
    needs = frozenset({"probs"})
    needs_layout = True
    edits = True
    Params = ReplaceParams

    def on_call(self, call: AttentionCall) -> None:
        p = self.params
        layout = call.layout
        if layout.kind == "joint":
            limit = p.cross_limit()
            if limit is None or call.step < limit:
                self._joint(call, p.mode == "refine")
            return
        if call.kind == "cross":
            limit = p.cross_limit()
            if limit is not None and call.step >= limit:
                return
            refine = p.mode == "refine"
        elif call.kind == "self":
            if call.step >= p.self_until_step:
                return
            refine = False
        else:
            return
        probs = call.probs
        new = probs.clone()
        for group in batch_groups(probs.shape[0], p.cfg):
            if p.source >= len(group):
                raise EditError(f"replace: source {p.source} outside a group of {len(group)} items")
            src = group[p.source]
            for b in group:
                if b == src:
                    continue
                new[b] = self._inject(probs[src], probs[b], call) if refine else probs[src]
        call.probs = new

    def _joint(self, call: AttentionCall, refine: bool) -> None:
        """Joint and single-stream blocks: the image-query x text-key block is injected from the source;
        each row's remaining (image-key) attention keeps its own distribution, scaled so the row sums to 1."""
        layout = call.layout
        if not layout.known:
            raise EditError(f"replace: the token layout at {call.site} is unknown ({layout.note}); exclude the site")
        text, image = layout.text, layout.image
        if text is None or image is None:
            return
        probs = call.probs
        new = probs.clone()
        for group in batch_groups(probs.shape[0], self.params.cfg):
            if self.params.source >= len(group):
                raise EditError(f"replace: source {self.params.source} outside a group of {len(group)} items")
            src = group[self.params.source]
            for b in group:
                if b == src:
                    continue
                own = probs[b, :, image]
                block = own[..., text]
                injected = self._inject(probs[src, :, image][..., text], block, call) if refine else \
                    probs[src, :, image][..., text]  # fmt: skip
                rest = own.sum(-1, keepdim=True) - block.sum(-1, keepdim=True)
                room = (1 - injected.sum(-1, keepdim=True)).clamp_min(0)
                row = own * (room / rest.clamp_min(1e-30))
                row[..., text] = injected
                new[b, :, image] = row
        call.probs = new

    def _inject(self, src: torch.Tensor, own: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        mapper = self.params.mapper or []
        n = own.shape[-1]
        if len(mapper) != n:
            raise EditError(f"replace: mapper has {len(mapper)} entries, {call.site} has {n} text tokens")
        idx = torch.tensor([m if m >= 0 else 0 for m in mapper], device=own.device)
        keep = torch.tensor([m < 0 for m in mapper], device=own.device)
        return torch.where(keep, own, src[..., idx])

    def __repr__(self) -> str:
        return f"Replace({self.params!r})"


