"""`Generation`: what one `pipe(...)` call is about — prompts, tokenizers, CFG layout, edit group.

Pure data. The tracer builds one per pipeline call (or per top-level call of a bare model, when the
user says so) and hands it to observers in `on_generation_start` / `on_generation_end`. Editors read
the batch layout from it instead of taking a `cfg` flag that can be set wrong.

The denoiser batch of a generation is `[uncond images..., cond images...]` when `cfg` is true and
`[cond images...]` otherwise; image `i` of `prompts` is row `i` of the conditional part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

__all__ = ["Generation"]


@dataclass(frozen=True)
class Generation:
    """One `pipe(...)` call (or one top-level call of a bare model, when the user says so)."""

    #: 0, 1, ... since attach or `tracer.reset()`.
    index: int
    #: Conditional prompt of each image in the batch (after `num_images_per_prompt`), in batch order.
    prompts: tuple[str, ...]
    #: One per image; "" where none was given.
    negative_prompts: tuple[str, ...]
    #: The pipeline's tokenizers in encoder order (tokenizer, tokenizer_2, tokenizer_3); () when unknown.
    tokenizers: tuple[Any, ...]
    #: The denoiser batch is [uncond images..., cond images...].
    cfg: bool
    #: `num_inference_steps` when known.
    num_steps: int | None
    #: For edit groups: index of the source image, then the edited ones.
    group: tuple[int, ...] | None = None
    #: Which tokenizer gives the text tokens the denoiser attends to, and where: (index into
    #: `tokenizers`, first text position, length) per encoder. () when unknown (then tokenizer 0 at 0).
    text_layout: tuple[tuple[int, int, int], ...] = ()

    @property
    def images(self) -> int:
        """Number of images (conditional batch rows) in this generation."""
        return len(self.prompts)

    def cond_rows(self, batch: int) -> slice:
        """Rows of the conditional images in a denoiser batch of size `batch`."""
        if not self.cfg:
            return slice(0, batch)
        if batch % 2:
            raise ConfigError(
                f"generation {self.index} uses classifier-free guidance but the denoiser batch has an odd size "
                f"{batch}; expected [uncond..., cond...]"
            )
        return slice(batch // 2, batch)

    def roles(self, batch: int) -> tuple[str, ...] | None:
        """The role (`cond` / `uncond`) of each row of a denoiser batch of size `batch`; None for a batch
        that cannot be this generation's (an odd batch under guidance)."""
        if not self.cfg:
            return ("cond",) * batch
        if batch % 2:
            return None
        return ("uncond",) * (batch // 2) + ("cond",) * (batch // 2)

    def uncond_rows(self, batch: int) -> slice | None:
        """Rows of the unconditional images, or None without CFG."""
        if not self.cfg:
            return None
        return slice(0, self.cond_rows(batch).start)

    def row(self, image: int, batch: int) -> int:
        """The denoiser batch row of conditional image `image`."""
        rows = self.cond_rows(batch)
        n = rows.stop - rows.start
        if not 0 <= image < n:
            raise ConfigError(f"image {image} is outside the {n} conditional rows of generation {self.index}")
        return rows.start + image

    @property
    def source(self) -> int | None:
        """The group's source image, or None outside an edit group."""
        return self.group[0] if self.group else None

    @property
    def edited(self) -> tuple[int, ...]:
        """The group's edited images (empty outside an edit group)."""
        return self.group[1:] if self.group else ()
