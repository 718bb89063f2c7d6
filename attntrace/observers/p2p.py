"""What prompt-to-prompt's editors share: the edit group's rows, the step windows, the cross/self blocks.

The rows come from the generation (`Generation.group` and its CFG layout): only the conditional
images are edited; image `group[0]` is the source, the others are edited. On a bare model with no
generation open, `source` (a conditional row) and the deprecated `cfg` flag say it instead.

Windows follow prompt-to-prompt exactly, for `T` denoising steps:
- cross-attention: a per-step, per-token alpha over `T + 1` entries; a fraction `f` (or `(a, b)`)
  selects steps `int(a·(T+1)) <= step < int(b·(T+1))`, and a dict gives some words their own window
  (`{"default_": 0.8, "dog": 0.4}`); outside a token's window its map is the edited prompt's own;
- self-attention: steps `int(a·T) <= step < int(b·T)`, only in maps with at most `self_max_queries`
  queries (prompt-to-prompt's 16² rule by default; None for every map).

On joint attention (SD3, Flux) the "cross map" is the image-query × text-key block and the "self map"
the image-query × image-key block of the one softmax; after an edit each edited image row is scaled
back to sum to one over its image keys (the text part as edited). Text-query rows are not touched.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..core.call import AttentionCall
from ..core.errors import ConfigError, EditError
from ..core.generation import Generation
from ..core.observer import Observer
from ..core.words import generation_positions

__all__ = ["GroupEdit", "GroupRows", "P2PParams", "Window"]

Window = float | tuple[float, float]


class P2PParams(BaseModel):
    """Parameters every prompt-to-prompt editor takes."""

    model_config = ConfigDict(extra="forbid")
    cross_replace_steps: Window | dict[str, Window] = Field(
        default=0.8,
        description="fraction (or [start, end]) of the steps whose cross maps are edited; a mapping gives words "
        "their own window, with 'default_' for the rest (prompt-to-prompt's int(f*(T+1)) rounding)",
    )
    self_replace_steps: Window = Field(
        default=0.0, description="fraction (or [start, end]) of the steps whose self maps come from the source"
    )
    self_max_queries: int | None = Field(
        default=256, ge=1, description="inject self maps only with at most this many queries (16²); null: all"
    )
    num_steps: int | None = Field(
        default=None, ge=1, description="denoising steps, when the generation does not say (bare models)"
    )
    source: int = Field(default=0, ge=0, description="bare models only: the conditional row of the source image")
    cfg: bool | None = Field(
        default=None,
        description="deprecated: bare models only, the batch is [uncond..., cond...] (pipelines say it themselves)",
    )

    @field_validator("cross_replace_steps", "self_replace_steps")
    @classmethod
    def _windows(cls, v: Any) -> Any:
        for w in v.values() if isinstance(v, dict) else [v]:
            lo, hi = (0.0, w) if isinstance(w, float | int) else w
            if not 0 <= lo <= hi <= 1:
                raise ValueError(f"a step window must be a fraction or [start, end] within [0, 1], got {w!r}")
        return v


def _write_block(probs: torch.Tensor, rows: list[int], q: slice, keys: slice, block: torch.Tensor) -> None:
    """Write `block` (len(rows), H, q, keys) into `probs[rows][:, :, q, keys]` (advanced row indexing copies,
    so a partial block goes through a copy of the rows)."""
    if q == slice(None) and keys == slice(None):
        probs[rows] = block
        return
    part = probs[rows]
    part[:, :, q, keys] = block
    probs[rows] = part


def _bounds(window: Window) -> tuple[float, float]:
    return (0.0, float(window)) if isinstance(window, float | int) else (float(window[0]), float(window[1]))


@dataclass
class GroupRows:
    """Batch rows of one call: the source image's row and the edited images' rows (and their images)."""

    source: int
    edited: list[int]
    images: list[int]  # image index (in the generation) of each edited row


class GroupEdit(Observer):
    """Base of the edit-group editors: rows, windows, blocks. Keeps one generation's schedules."""

    needs = frozenset({"probs"})
    edits = True
    group_editor = True
    requires_group = True

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.generation: Generation | None = None
        self._alpha: torch.Tensor | None = None  # (T+1, edited, text tokens)
        self._edited = False
        self._warned = False

    # -- generation ------------------------------------------------------------------------------
    def on_generation_start(self, generation: Generation) -> None:
        self.generation = generation
        self._alpha = None
        self._edited = False
        self.prepare(generation)

    def prepare(self, generation: Generation) -> None:
        """Resolve words and alignments for a new generation (subclasses)."""

    def on_generation_end(self, generation: Generation, images: Any | None) -> None:
        if not self._edited and generation.group is None and not self._warned:
            self._warned = True
            warnings.warn(
                f"attntrace: {self.name} had nothing to edit in generation {generation.index} "
                f"({len(generation.prompts)} image(s), no edit group): give a source prompt and edited prompts "
                "(pipe([source, edited, ...]) or a group item in YAML: inputs.prompts: [[source, edited]])",
                RuntimeWarning,
                stacklevel=2,
            )
        self.generation = None

    def reset(self) -> None:
        self.generation = None
        self._alpha = None

    # -- rows ------------------------------------------------------------------------------------
    def rows(self, batch: int) -> GroupRows | None:
        """The source and edited rows of a batch, or None when there is no group to edit."""
        gen = self.generation
        if gen is not None:
            if gen.group is None or len(gen.group) < 2:
                return None
            cond = gen.cond_rows(batch)
            if cond.stop - cond.start != len(gen.prompts):
                raise EditError(
                    f"{self.name}: the denoiser batch {batch} does not hold the generation's {len(gen.prompts)} "
                    f"image(s){' twice (CFG)' if gen.cfg else ''}"
                )
            return GroupRows(cond.start + gen.group[0], [cond.start + i for i in gen.group[1:]], list(gen.group[1:]))
        p = self.params
        start = 0
        if p.cfg:
            if batch % 2:
                raise EditError(f"{self.name}: cfg: true needs an even batch ([uncond..., cond...]), got {batch}")
            start = batch // 2
        n = batch - start
        if p.source >= n:
            raise EditError(f"{self.name}: source {p.source} outside the {n} conditional row(s)")
        edited = [i for i in range(n) if i != p.source]
        if not edited:
            return None
        return GroupRows(start + p.source, [start + i for i in edited], edited)

    def total_steps(self) -> int:
        gen = self.generation
        n = gen.num_steps if gen is not None and gen.num_steps else self.params.num_steps
        if not n:
            raise ConfigError(
                f"{self.name}: the number of denoising steps is unknown (no pipeline generation); set num_steps",
                field="num_steps",
            )
        return int(n)

    def positions(self, image: int, words: list[str], n_text: int, field: str) -> list[list[int]]:
        """Text positions of `words` in image `image`'s prompt (words need a pipeline generation)."""
        if self.generation is None:
            raise ConfigError(
                f"{self.name}: words need the prompts and tokenizer of a pipeline call: attach the tracer to the "
                "pipeline, or open tracer.generation(prompts, tokenizers=...), or give token positions",
                field=field,
            )
        return generation_positions(self.generation, image, words, n_text=n_text, field=field)

    # -- windows ---------------------------------------------------------------------------------
    def cross_alpha(self, rows: GroupRows, n_text: int) -> torch.Tensor:
        """(T+1, edited, text tokens) 0/1 schedule of the cross edit, built once per generation."""
        if self._alpha is not None and self._alpha.shape[1:] == (len(rows.edited), n_text):
            return self._alpha
        steps = self.total_steps()
        windows = self.params.cross_replace_steps
        if not isinstance(windows, dict):
            windows = {"default_": windows}
        default = windows.get("default_", windows.get("default", (0.0, 1.0)))
        alpha = torch.zeros(steps + 1, len(rows.edited), n_text)

        def put(window: Window, e: int, cols: Any) -> None:
            lo, hi = _bounds(window)
            start, end = int(lo * (steps + 1)), int(hi * (steps + 1))
            alpha[:start, e, cols] = 0
            alpha[start:end, e, cols] = 1
            alpha[end:, e, cols] = 0

        for e in range(len(rows.edited)):
            put(default, e, slice(None))
        for word, window in windows.items():
            if word in ("default_", "default"):
                continue
            found = False
            for e, image in enumerate(rows.images):
                try:
                    (pos,) = self.positions(image, [word], n_text, "cross_replace_steps")
                except ConfigError:
                    continue  # as prompt-to-prompt: a word absent from one edited prompt gets no window there
                put(window, e, pos)
                found = True
            if not found:
                prompts = [self.generation.prompts[i] for i in rows.images] if self.generation else []
                raise ConfigError(f"word {word!r} is in none of the edited prompts {prompts}",
                                  field="cross_replace_steps")  # fmt: skip
        self._alpha = alpha
        return alpha

    def alpha_at(self, rows: GroupRows, n_text: int, step: int) -> torch.Tensor | None:
        """The (edited, text) cross alpha of `step`, or None when no token is edited then."""
        alpha = self.cross_alpha(rows, n_text)
        if step < alpha.shape[0] and bool(alpha[step].any()):
            return alpha[step]
        return None

    def self_active(self, step: int, queries: int) -> bool:
        """Whether the self maps of this step and size come from the source."""
        lo, hi = _bounds(self.params.self_replace_steps)
        steps = self.total_steps() if hi > 0 else 1
        limit = self.params.self_max_queries
        return int(steps * lo) <= step < int(steps * hi) and (limit is None or queries <= limit)

    # -- the call --------------------------------------------------------------------------------
    #: True for editors whose cross map is a mapping of the source's (replace, refine): a later editor in
    #: the same call (reweight) scales that mapping, as prompt-to-prompt's `controller=` chaining does.
    maps_source: bool = False

    def on_call(self, call: AttentionCall) -> None:
        if call.kind not in ("cross", "self", "joint"):
            return
        rows = self.rows(call.query.shape[0])
        if rows is None:
            self.without_group(call)
            return
        chain = call.extra.get("p2p_map")
        if self.maps_source:
            call.extra["p2p_map"] = self.cross_map
        if call.kind == "joint":
            q, text, image = call.image_tokens, call.text_tokens, call.image_tokens
            if q is None or text is None:
                return
        elif call.kind == "cross":
            q, text, image = slice(None), call.text_tokens or slice(None), None
        else:
            q, text, image = slice(None), None, slice(None)
        n_q = call.query.shape[-2] if q == slice(None) else q.stop - q.start
        do_self = image is not None and self.self_active(call.step, n_q)
        cross_alpha = None
        if text is not None:
            n_text = (text.stop - text.start) if text.stop is not None else call.key.shape[-2]
            cross_alpha = self.alpha_at(rows, n_text, call.step)
        if cross_alpha is None and not do_self:
            return
        # The maps as the model made them (before any editor of this call): a chained editor starts there.
        probs = call.extra.setdefault("p2p_probs", call.probs)
        new = call.probs.clone()
        ed = rows.edited
        if cross_alpha is not None:
            assert text is not None
            src = probs[rows.source][:, q, text]
            own = probs[ed][:, :, q, text]
            a = cross_alpha.to(own.device).reshape(len(ed), 1, 1, -1)
            blended = self.cross_map(call, rows, src, own, chain) * a + (1 - a) * own
            _write_block(new, ed, q, text, blended)
        if do_self:
            assert image is not None
            src_self = probs[rows.source][:, q, image]
            _write_block(new, ed, q, image, src_self.unsqueeze(0).expand(len(ed), *src_self.shape))
        if call.kind == "joint":
            self._renormalize_joint(new, ed, q, text, image)
        call.probs = new
        self._edited = True

    def cross_map(
        self, call: AttentionCall, rows: GroupRows, src: torch.Tensor, own: torch.Tensor, chain: Any = None
    ) -> torch.Tensor:
        """The edited rows' cross maps inside the window, (edited, H, Q, T), from the source's (H, Q, T)
        and the edited rows' own (edited, H, Q, T); `chain` is a preceding editor's `cross_map`."""
        raise NotImplementedError

    def without_group(self, call: AttentionCall) -> None:
        """A call with no edit group (one image): nothing by default."""

    @staticmethod
    def _renormalize_joint(new: torch.Tensor, ed: list[int], q: slice, text: slice, image: slice | None) -> None:
        if image is None:
            return
        block = new[ed]
        rows = block[:, :, q]
        text_mass = rows[..., text].sum(-1, keepdim=True)
        img = rows[..., image]
        img_mass = img.sum(-1, keepdim=True).clamp_min(1e-30)
        rows[..., image] = img * ((1 - text_mass).clamp_min(0) / img_mass)
        block[:, :, q] = rows
        new[ed] = block
