"""`Observer`: the small base class every analysis and editor derives from."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError
from .messages import short_repr, unknown_parameter
from .site import Site

if TYPE_CHECKING:
    import torch

    from .call import AttentionCall
    from .generation import Generation

__all__ = ["NEEDS", "AttachmentView", "NoParams", "Observer", "batch_rows"]

#: What an observer may read from a call; `probs` is the costly one.
NEEDS = frozenset({"query", "key", "value", "probs", "output"})


class AttachmentView(Protocol):
    """What an observer sees of the attachment in `on_attach` (`attntrace.Attachment` is one)."""

    model: torch.nn.Module
    sites: list[Site]

    @property
    def step(self) -> int: ...

    @property
    def traced_sites(self) -> list[str]: ...

    @property
    def output_dir(self) -> Path | None: ...


class NoParams(BaseModel):
    """Parameters of an observer that takes none."""

    model_config = ConfigDict(extra="forbid")


class Observer:
    """Base class for observers and editors.

    Subclasses set `needs` (a subset of `NEEDS`: probabilities are computed only where some observer
    needs them), implement `on_call(call)`, and may override `on_attach`, `on_step_end`, `on_skip`,
    `on_generation_start` / `on_generation_end`, `result`, `save` and `close`.
    Observers used from YAML declare a pydantic `Params` model; its validated instance is
    `self.params`. Keyword arguments to the constructor are those params.
    """

    #: Name used in YAML rules (`use: NAME`); set by the registry for plugins.
    name: ClassVar[str] = ""
    #: What this observer reads from each call.
    needs: ClassVar[frozenset[str]] = frozenset()
    #: True for observers that assign to the call (editors).
    edits: ClassVar[bool] = False
    #: True for observers that read which tokens are text and image (`call.layout`): refused at attach on
    #: sites whose layout cannot be known.
    needs_layout: ClassVar[bool] = False
    #: The probability layouts (`Layout.probs`) this observer understands: an observer that reads probs,
    #: edits or needs the token layout is refused at attach on sites of any other (banded sliding-window
    #: probabilities are not a token x token matrix).
    probs_layouts: ClassVar[frozenset[str]] = frozenset({"dense"})
    #: The pydantic model validating this observer's parameters.
    Params: ClassVar[type[BaseModel]] = NoParams
    #: True for editors that work across the images of an edit group (source and edited prompts):
    #: a pipeline call with two or more prompts then becomes one edit group sharing start latents.
    group_editor: ClassVar[bool] = False
    #: True for editors that only make sense on an edit group (replace, local_blend...): a YAML item that
    #: is a single prompt is then an error at validation, not a silent no-op.
    requires_group: ClassVar[bool] = False

    def __init__(self, params: BaseModel | dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.params = self.validate_params(params if params is not None else kwargs)
        self.output_dir: Path | None = None

    @classmethod
    def validate_params(cls, params: BaseModel | dict[str, Any], field: str = "with") -> Any:
        """Validate `params` against `Params`, raising `ConfigError` that names the field path."""
        if isinstance(params, cls.Params):
            return params
        if isinstance(params, BaseModel):
            params = params.model_dump()
        try:
            return cls.Params.model_validate(params or {})
        except ValidationError as exc:
            raise ConfigError(_first_error(exc, cls), field=_error_path(exc, field)) from None

    def on_attach(self, attachment: AttachmentView) -> None:
        """Called once when the tracer attaches, with the attachment (sites, model, output dir)."""

    def on_call(self, call: AttentionCall) -> None:
        """Called for every attention kernel call at a matched site and step."""

    def on_step_end(self, step: int) -> None:
        """Called after each top-level forward of the traced model."""

    def on_skip(self, site: str, step: int) -> None:
        """Called at the end of `step` for a matched site that ran no attention then (cached or skipped)."""

    def on_generation_start(self, generation: Generation) -> None:
        """Called before each generation (a `pipe(...)` call under an attached pipeline); steps restart at 0."""

    def on_generation_end(self, generation: Generation, images: Any | None) -> None:
        """Called after each generation with its output images (None when unknown)."""

    def on_latents(self, step: int, latents: torch.Tensor) -> torch.Tensor | None:
        """Called at the end of each denoising step of a pipeline generation, only for observers that
        override it (the tracer then hooks the pipeline's `callback_on_step_end`). Return new latents
        to replace them, or None."""
        return None

    def reset(self) -> None:
        """Forget what was collected (`tracer.reset()`); the observer stays usable. Default: nothing kept."""

    def result(self) -> Any:
        """What this observer collected (a table, a dict of tensors...)."""
        return None

    def save(self, directory: Path) -> list[Path]:
        """Write results under `directory`; return the files written."""
        return []

    def close(self) -> None:
        """Release what this observer holds (tensors, files, threads)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"


def batch_rows(call: AttentionCall, cond_half: bool, *, strict: bool = True) -> slice:
    """The batch items to keep: all, or the conditional rows of a guidance batch — those the call's layout
    labels `cond` (from the generation), else, unlabelled, the second half of an [uncond, cond] batch (an odd
    unlabelled batch: an error, or with `strict=False` every row)."""
    batch = call.shape[0]
    if not cond_half:
        return slice(0, batch)
    labelled = call.layout.rows("cond")
    if labelled is not None:
        return labelled
    if batch % 2 and not strict:
        return slice(0, batch)
    if batch % 2:
        raise ConfigError(
            f"cond_half needs an even (uncond + cond) batch, got batch {batch} at site {call.site!r}",
            field="cond_half",
        )
    return slice(batch // 2, batch)


def _error_path(exc: ValidationError, prefix: str) -> str:
    err = exc.errors()[0]
    return ".".join([prefix, *(str(p) for p in err.get("loc", ()))])


def _first_error(exc: ValidationError, cls: type[Observer]) -> str:
    err = exc.errors()[0]
    msg = str(err.get("msg", "invalid value"))
    if err.get("type") == "extra_forbidden":
        return unknown_parameter(cls.name or cls.__name__, cls.Params.model_fields)
    return f"{msg} (got {short_repr(err.get('input'))})"
