"""`replace`: prompt-to-prompt's word swap and refinement across the images of an edit group.

In an edit group (a source prompt and edited prompts sharing start latents, one pipeline call), the
edited images' cross maps are built from the source's, on the conditional rows only:
- `mode: replace` (word swap, same number of words): a swapped word's tokens take the source word's
  map, split evenly when the token count changed (the aligner's float matrix);
- `mode: refine` (words added or removed): each token takes its aligned source token's map, new
  tokens keep their own (the aligner's mapper and alphas).
Within `self_replace_steps`, self maps with at most `self_max_queries` queries come from the source.
The group, the CFG layout and the step count come from the pipeline call; see `p2p.py` for the
windows and for joint attention (SD3/Flux: the image-query × text-key block).

Memory: one (T+1, edited, text) schedule and one alignment per edited prompt, per generation.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from ..core.call import AttentionCall
from ..core.errors import ConfigError, EditError
from ..core.generation import Generation
from ..core.words import segments
from .align import refinement_mapper, replacement_mapper
from .p2p import GroupEdit, GroupRows, P2PParams

__all__ = ["Replace", "ReplaceParams", "batch_groups"]


def batch_groups(batch: int, cfg: bool) -> list[range]:
    """The independent groups of a batch: the whole batch, or its two CFG halves (bare-model helpers)."""
    if not cfg:
        return [range(batch)]
    if batch % 2:
        raise EditError(f"cfg: true needs an even batch ([uncond..., cond...]), got batch {batch}")
    half = batch // 2
    return [range(0, half), range(half, batch)]


class ReplaceParams(P2PParams):
    """Parameters of `replace`."""

    mode: Literal["replace", "refine"] = "replace"
    self_replace_steps: float | tuple[float, float] = Field(
        default=0.4, description="fraction (or [start, end]) of the steps whose self maps come from the source"
    )
    shift_after_swap: bool = Field(
        default=False,
        description="word swap: map the tokens after a swapped word whose token count changed to their shifted "
        "source tokens (prompt-to-prompt maps them position by position; false keeps its behaviour)",
    )
    mapper: list[int] | None = Field(
        default=None, description="refine without a tokenizer: target token -> source token (-1 keeps its own)"
    )
    # Deprecated integer windows (before prompt-to-prompt's fractions): still honoured.
    cross_until_step: int | None = Field(default=None, ge=0, description="deprecated: cross edit at steps < this")
    steps_fraction: float | None = Field(default=None, ge=0, le=1, description="deprecated: cross_replace_steps")
    total_steps: int | None = Field(default=None, ge=1, description="deprecated: num_steps")
    self_until_step: int | None = Field(default=None, ge=0, description="deprecated: self injection at steps < this")

    @model_validator(mode="after")
    def _legacy(self) -> ReplaceParams:
        if self.steps_fraction is not None:
            if self.total_steps is None:
                raise ValueError("steps_fraction needs total_steps (or use cross_replace_steps)")
            if self.cross_until_step is not None:
                raise ValueError("give cross_until_step or steps_fraction, not both")
        return self


class Replace(GroupEdit):
    """Prompt-to-prompt word swap / refinement of cross maps, and self-map injection, in an edit group."""

    name = "replace"
    needs_layout = True
    Params = ReplaceParams
    maps_source = True

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._maps: dict[tuple[int, int], Any] = {}

    def prepare(self, generation: Generation) -> None:
        self._maps = {}

    # -- legacy integer windows ------------------------------------------------------------------
    def _legacy(self) -> bool:
        p = self.params
        return p.self_until_step is not None or p.cross_until_step is not None or p.steps_fraction is not None

    def alpha_at(self, rows: GroupRows, n_text: int, step: int) -> torch.Tensor | None:
        p = self.params
        if not self._legacy():
            return super().alpha_at(rows, n_text, step)
        limit = p.cross_until_step
        if p.steps_fraction is not None:
            limit = int(p.steps_fraction * p.total_steps)
        if limit is not None and step >= limit:
            return None
        return torch.ones(len(rows.edited), n_text)

    def self_active(self, step: int, queries: int) -> bool:
        if self._legacy():
            return step < (self.params.self_until_step or 0)
        return super().self_active(step, queries)

    # -- the maps --------------------------------------------------------------------------------
    def cross_map(
        self, call: AttentionCall, rows: GroupRows, src: torch.Tensor, own: torch.Tensor, chain: Any = None
    ) -> torch.Tensor:
        n_text = src.shape[-1]
        if self.params.mode == "replace":
            mapper = self._mapper(rows, n_text).to(src.device, src.dtype)
            return torch.einsum("hpw,bwn->bhpn", src, mapper)
        index, alphas = self._refiner(rows, n_text)
        mapped = src[:, :, index.to(src.device)].permute(2, 0, 1, 3)
        a = alphas.to(src.device, src.dtype).reshape(len(rows.edited), 1, 1, -1)
        return mapped * a + own * (1 - a)

    def _mapper(self, rows: GroupRows, n_text: int) -> torch.Tensor:
        key = (n_text, 0)
        if key not in self._maps:
            self._maps[key] = torch.stack([self._per_segment(rows.images[e], n_text, "replace")
                                           for e in range(len(rows.edited))])  # fmt: skip
        return self._maps[key]

    def _refiner(self, rows: GroupRows, n_text: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (n_text, 1)
        if key not in self._maps:
            if self.params.mapper is not None:
                m = self.params.mapper
                if len(m) != n_text:
                    raise EditError(f"replace: mapper has {len(m)} entries, the text has {n_text} tokens")
                index = torch.tensor(m).expand(len(rows.edited), -1)
                alphas = (index != -1).float()
            else:
                pairs = [self._per_segment(rows.images[e], n_text, "refine") for e in range(len(rows.edited))]
                index = torch.stack([p[0] for p in pairs])
                alphas = torch.stack([p[1] for p in pairs])
            self._maps[key] = (index, alphas)
        return self._maps[key]

    def _per_segment(self, image: int, n_text: int, mode: str) -> Any:
        """The alignment of one edited prompt with the source, encoder by encoder (SD3: CLIP then T5)."""
        gen = self.generation
        if gen is None and mode == "replace":
            return torch.eye(n_text)  # a bare model without prompts: the source's maps are copied whole
        if gen is None or gen.group is None:
            raise ConfigError(
                "replace needs the source and edited prompts with a tokenizer (attach to the pipeline, or "
                "tracer.generation(prompts, tokenizers=..., group=...)); without them give mode: refine and mapper",
                field="mode",
            )
        source, target = gen.prompts[gen.group[0]], gen.prompts[image]
        if mode == "replace":
            out: Any = torch.eye(n_text)
            for tok, start, length in segments(gen, n_text):
                length = min(length, n_text - start)
                block = replacement_mapper(tok, source, target, length,
                                           shift_after_swap=self.params.shift_after_swap)  # fmt: skip
                out[start : start + length, start : start + length] = block
            return out
        index = torch.arange(n_text)
        alphas = torch.ones(n_text)
        for tok, start, length in segments(gen, n_text):
            length = min(length, n_text - start)
            m, a = refinement_mapper(tok, source, target, length)
            # -1 (no source token) indexes the segment's last token, weighted 0, as in prompt-to-prompt
            index[start : start + length] = torch.where(m < 0, m + length, m) + start
            alphas[start : start + length] = a
        return index, alphas

    def on_generation_end(self, generation: Generation, images: Any | None) -> None:
        if generation.group is not None and self.params.mode == "replace":
            same = [i for i in generation.group[1:] if generation.prompts[i] == generation.prompts[generation.group[0]]]
            if same:
                warnings.warn(
                    f"attntrace: replace: edited prompt(s) {same} equal the source prompt; nothing was swapped",
                    RuntimeWarning,
                    stacklevel=2,
                )
        super().on_generation_end(generation, images)
