"""`local_blend`: prompt-to-prompt's LocalBlend — keep the edit where the chosen words are, the source elsewhere.

At the end of every denoising step (through the pipeline's `callback_on_step_end`, composed with the
caller's own) the edited images' latents are blended with the source's:
`x = x_source + mask * (x - x_source)`. The mask comes from the cross maps of the chosen words, as
edited by the editors before this rule (put `local_blend` after `replace`/`reweight`), summed over
the steps so far at the layers whose image grid is `map_size` (prompt-to-prompt: 16x16 for 64x64
latents, i.e. a quarter of the latent side, the default on UNets; DiTs have one grid): averaged over
heads and layers, max-pooled 3x3, resized to the latents (nearest), divided by its maximum,
thresholded, and united with the source's mask. `subtract_words` removes the region of other words.
Blending starts after `int(start_blend * T)` steps.

Memory: per generation, one float32 sum (images, heads, map_size², text tokens) per selected layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from ..core.call import AttentionCall
from ..core.errors import ConfigError, EditError
from ..core.generation import Generation
from .p2p import GroupEdit, P2PParams

__all__ = ["LocalBlend", "LocalBlendParams"]

Words = list[str | list[str]]


class LocalBlendParams(P2PParams):
    """Parameters of `local_blend` (the step windows of P2PParams do not apply)."""

    words: Words = Field(
        description="per prompt of the group (source first), the word(s) whose region is edited: ['cat', 'dog'] "
        "or [['cat'], ['dog', 'hat']], as prompt-to-prompt's LocalBlend(prompts, words)"
    )
    subtract_words: Words | None = Field(default=None, description="per prompt, words whose region is kept")
    threshold: float | tuple[float, float] = Field(
        default=0.3, description="mask threshold (of the max), or [words, subtract_words] thresholds"
    )
    start_blend: float = Field(default=0.2, ge=0, le=1, description="blend from step int(start_blend * T) on")
    map_size: int | None = Field(default=None, ge=1, description="side of the maps used (default: latent side / 4)")

    @field_validator("words")
    @classmethod
    def _some(cls, v: Words) -> Words:
        if not v or any(not w for w in v):
            raise ValueError("give a word (or a list of words) for each prompt of the group")
        return v


class LocalBlend(GroupEdit):
    """Blend edited latents with the source's outside the chosen words' attention region."""

    name = "local_blend"
    Params = LocalBlendParams
    edits = False  # reads the (edited) maps; changes latents, not attention

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.sums: dict[tuple[str, int], torch.Tensor] = {}
        self._hw: tuple[int, int] | None = None
        self._unet = True
        self._root: tuple[int, int] | None = None
        self._attachment: Any = None

    def on_attach(self, attachment: Any) -> None:
        self._attachment = attachment
        self._unet = hasattr(attachment.model, "down_blocks")
        labels = [e.observer for e in attachment.tracer.entries]
        later = [o for o in labels[labels.index(self) + 1 :] if o.edits] if self in labels else []
        if later:
            raise ConfigError(
                f"local_blend reads the edited maps: put it after the editors ({', '.join(o.name for o in later)})",
                field="rules",
            )

    def prepare(self, generation: Generation) -> None:
        self.sums = {}
        self._hw = None

    def reset(self) -> None:
        super().reset()
        self.sums = {}

    def result(self) -> dict[str, Any]:
        return {"layers": len(self.sums), "map_size": self._hw}

    # -- collecting the maps ---------------------------------------------------------------------
    def _wanted(self, hw: tuple[int, int]) -> bool:
        size = self.params.map_size
        if size is not None:
            return hw == (size, size) or max(hw) == size
        if self._unet:
            root = getattr(self._attachment, "root_hw", None) if self._attachment is not None else None
            return root is not None and hw == (root[0] // 4, root[1] // 4)
        if self._hw is None:
            return True
        return hw == self._hw

    def on_call(self, call: AttentionCall) -> None:
        if call.kind not in ("cross", "joint") or call.image_hw is None or self.generation is None:
            return
        gen = self.generation
        if gen.group is None:
            return
        hw = tuple(call.image_hw)
        self.__dict__.setdefault("_grids", set()).add(hw)
        if not self._wanted(hw):  # type: ignore[arg-type]
            return
        text = call.text_tokens or slice(None)
        q = slice(None) if call.kind == "cross" else call.image_tokens
        if q is None:
            return
        rows = gen.cond_rows(call.query.shape[0])
        maps = call.probs[rows][:, :, q, text]
        if maps.shape[-2] != hw[0] * hw[1]:
            return
        self._hw = hw  # type: ignore[assignment]
        key = (call.site, call.index)
        total = self.sums.get(key)
        if total is None:
            self.sums[key] = maps.clone()
        else:
            total += maps

    # -- the blend -------------------------------------------------------------------------------
    def _word_alpha(self, words: Words | None, n_text: int, field: str) -> torch.Tensor | None:
        gen = self.generation
        assert gen is not None
        if words is None:
            return None
        n = len(gen.prompts)
        if len(words) != n:
            raise ConfigError(
                f"one entry per prompt of the group (source first): {len(words)} for {n} prompts {list(gen.prompts)}",
                field=field,
            )
        alpha = torch.zeros(n, 1, 1, 1, 1, n_text)
        for i, entry in enumerate(words):
            mine = [entry] if isinstance(entry, str) else entry
            for pos in self.positions(i, list(mine), n_text, field):
                alpha[i, ..., pos] = 1
        return alpha

    def _mask(self, maps: torch.Tensor, alpha: torch.Tensor, pool: bool, size: tuple[int, ...]) -> torch.Tensor:
        th = self.params.threshold
        th = (th, th) if isinstance(th, float | int) else th
        m = (maps * alpha.to(maps.device, maps.dtype)).sum(-1).mean(1)
        if pool:
            m = F.max_pool2d(m, (3, 3), (1, 1), padding=(1, 1))
        m = F.interpolate(m, size=size)
        m = m / m.max(2, keepdim=True)[0].max(3, keepdim=True)[0]
        m = m.gt(th[1 - int(pool)])
        return m[:1] + m

    def on_latents(self, step: int, latents: torch.Tensor) -> torch.Tensor | None:
        gen = self.generation
        if gen is None or gen.group is None:
            return None
        if step + 1 <= int(self.params.start_blend * self.total_steps()):
            return None
        if not self.sums or self._hw is None:
            raise EditError(
                "local_blend saw no cross maps of the chosen size "
                f"({self.params.map_size or 'latent side / 4'}); set map_size to a grid side the model has "
                f"(seen: {sorted(self.__dict__.get('_grids', set()))})"
            )
        h, w = self._hw
        parts = [s.reshape(s.shape[0], s.shape[1], 1, h, w, s.shape[-1]) for s in self.sums.values()]
        maps = torch.cat(parts, dim=1)
        n_text = maps.shape[-1]
        packed = latents.dim() == 3
        if latents.dim() not in (3, 4) or (packed and latents.shape[1] != h * w):
            raise EditError(f"local_blend cannot lay a {h}x{w} mask on latents of shape {tuple(latents.shape)}")
        size = (h, w) if packed else tuple(latents.shape[2:])
        mask = self._mask(maps, self._word_alpha(self.params.words, n_text, "words"), True, size)  # type: ignore[arg-type]
        sub = self._word_alpha(self.params.subtract_words, n_text, "subtract_words")
        if sub is not None:
            mask = mask * ~self._mask(maps, sub, False, size)
        mask = mask.float().to(latents.device, latents.dtype)
        if packed:
            mask = mask.reshape(mask.shape[0], 1, h * w).transpose(1, 2)
        src = latents[gen.group[0] : gen.group[0] + 1]
        return src + mask * (latents - src)
