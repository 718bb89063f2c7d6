"""`reweight`: prompt-to-prompt's attention re-weighting (the equaliser) of chosen words.

In an edit group the edited images' cross maps become the source's maps (or, after a `replace` rule
on the same sites, that rule's word swap / refinement of them) with the chosen tokens' columns
multiplied by `factor` — inside `cross_replace_steps`; the source and the unconditional rows are
left alone, as prompt-to-prompt's `AttentionReweight` does. `factor` may give one value per edited
prompt. Without a group (one prompt), the conditional rows' own maps are scaled (`renormalize`
rescales each row to sum to one); on a bare model with no generation, every row is.

Words (`words: ["red dog"]`) are resolved in each prompt with the pipeline's tokenizer(s); `tokens`
gives positions directly. On joint attention (SD3/Flux) the image-query × text-key block is scaled.

Memory: nothing kept between calls beyond one generation's schedule.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, model_validator

from ..core.call import AttentionCall
from ..core.errors import EditError
from .p2p import GroupEdit, GroupRows, P2PParams

__all__ = ["Reweight", "ReweightParams"]


class ReweightParams(P2PParams):
    """Parameters of `reweight`."""

    words: list[str] | None = Field(
        default=None, description="words or phrases to reweight ('dog', 'red dog', 'dog#2')"
    )
    tokens: list[int] | None = Field(default=None, description="or: text token positions (as the encoder sees them)")
    factor: float | list[float] = Field(description="multiplier of the attention to them (one per edited prompt)")
    renormalize: bool = Field(default=False, description="without a group: rescale each row to sum to one afterwards")

    @model_validator(mode="after")
    def _what(self) -> ReweightParams:
        if (self.words is None) == (self.tokens is None):
            raise ValueError("give words (resolved with the pipeline's tokenizer) or tokens (positions), not both")
        if self.words is not None and not self.words:
            raise ValueError("words must not be empty")
        if self.tokens is not None and not self.tokens:
            raise ValueError("tokens must not be empty")
        return self


class Reweight(GroupEdit):
    """Scale the attention to chosen words: P2P's equaliser in an edit group, else the rows' own maps."""

    name = "reweight"
    needs_layout = True
    Params = ReweightParams
    requires_group = False  # one prompt: its own maps are scaled

    def _columns(self, image: int, n_text: int) -> list[int]:
        cache = self.__dict__.setdefault("_cols", {})
        if (image, n_text) not in cache:
            cache[(image, n_text)] = self._find_columns(image, n_text)
        return cache[(image, n_text)]

    def _find_columns(self, image: int, n_text: int) -> list[int]:
        p = self.params
        if p.tokens is not None:
            bad = [t for t in p.tokens if not -n_text <= t < n_text]
            if bad:
                raise EditError(f"reweight: tokens {bad} out of range for {n_text} text tokens")
            return [t % n_text for t in p.tokens]
        return sorted({i for pos in self.positions(image, list(p.words or []), n_text, "words") for i in pos})

    def _factors(self, count: int) -> list[float]:
        f = self.params.factor
        if isinstance(f, list):
            if len(f) not in (1, count):
                raise EditError(f"reweight: factor has {len(f)} values for {count} edited prompt(s)")
            return f * count if len(f) == 1 else f
        return [f] * count

    def prepare(self, generation: Any) -> None:
        self._eq: dict[tuple[int, ...], torch.Tensor] = {}
        self._cols: dict[tuple[int, int], list[int]] = {}

    def equalizer(self, rows: GroupRows, n_text: int) -> torch.Tensor:
        """(edited, text) multipliers: `factor` on each edited prompt's chosen tokens, 1 elsewhere (once per
        generation: words are resolved with the tokenizer once, not at every call)."""
        cache = self.__dict__.setdefault("_eq", {})
        key = (n_text, *rows.images)
        if key not in cache:
            cache[key] = self._equalizer(rows, n_text)
        return cache[key]

    def _equalizer(self, rows: GroupRows, n_text: int) -> torch.Tensor:
        factors = self._factors(len(rows.edited))
        eq = torch.ones(len(rows.edited), n_text)
        for e, image in enumerate(rows.images):
            eq[e, self._columns(image, n_text)] = factors[e]
        return eq

    def cross_map(
        self, call: AttentionCall, rows: GroupRows, src: torch.Tensor, own: torch.Tensor, chain: Any = None
    ) -> torch.Tensor:
        base = chain(call, rows, src, own) if chain is not None else src.unsqueeze(0)
        eq = self.equalizer(rows, src.shape[-1]).to(src.device, src.dtype)
        return base * eq[:, None, None, :]

    def rows(self, batch: int) -> GroupRows | None:
        # A bare model with no generation keeps the plain re-weighting of every row (no source to copy from).
        return super().rows(batch) if self.generation is not None else None

    # -- no group: scale the rows' own maps ------------------------------------------------------
    def without_group(self, call: AttentionCall) -> None:
        text = call.text_tokens
        if call.kind not in ("cross", "joint") or text is None:
            return
        n_text = text.stop - text.start
        batch = call.query.shape[0]
        gen = self.generation
        if gen is not None:
            rows = gen.cond_rows(batch)
            images = list(range(rows.stop - rows.start))
        else:
            rows = slice(batch // 2, batch) if self.params.cfg else slice(0, batch)
            images = [0] * (rows.stop - rows.start)
        qrows = slice(None) if call.kind == "cross" else call.image_tokens
        if qrows is None:
            return
        probs = call.probs
        new = probs.clone()
        factor = self._factors(1)[0]
        for offset, image in enumerate(images):
            b = rows.start + offset
            cols = torch.tensor([text.start + c for c in self._columns(image, n_text)], device=probs.device)
            block = new[b, :, qrows]
            block[..., cols] = block[..., cols] * factor
            if self.params.renormalize:
                block /= block.sum(-1, keepdim=True).clamp_min(1e-30)
            new[b, :, qrows] = block
        call.probs = new
        self._edited = True

    def on_generation_end(self, generation: Any, images: Any | None) -> None:
        self._edited = True  # one prompt is a valid use (its own maps are scaled): no "nothing to edit" warning
        super().on_generation_end(generation, images)
