"""Generations of a diffusers pipeline: learning each `pipe(...)` call's prompts, tokenizers and layout.

`tracer.attach(pipe)` traces the pipeline's denoiser and, through `PipelineHook`, wraps the pipeline's
call: the object's class is swapped for a subclass (same name) whose `__call__` reads the call's
arguments, opens a generation, runs the original call and closes the generation with the output
images. Detaching swaps the original class back, so `type(pipe)` is exactly what it was.

What a call tells:
- prompts and negative prompts, expanded by `num_images_per_prompt` (`num_videos_per_prompt`) in
  diffusers' order (each prompt's copies together);
- the classifier-free-guidance layout, from the pipeline's own `do_classifier_free_guidance` (so
  guidance-free and distilled models are right) and checked against the denoiser's first batch;
- the tokenizers in encoder order, and which encoder's tokens the denoiser attends to (`text_layout`);
- for edit groups, the start latents: every image of a group starts from the source's latents, as
  prompt-to-prompt and MasaCtrl do (unless the caller passed `latents`);
- a step-end hook for observers that change latents (`Observer.on_latents`), composed with the
  caller's own `callback_on_step_end`.
"""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .core.errors import ConfigError

if TYPE_CHECKING:
    from .lifecycle import GenerationLifecycle as Attachment

__all__ = ["PipelineHook", "is_pipeline", "text_layout"]

_HOOKS: weakref.WeakKeyDictionary[Any, PipelineHook] = weakref.WeakKeyDictionary()
_SUBCLASSES: dict[type, type] = {}
_PER_PROMPT = ("num_images_per_prompt", "num_videos_per_prompt")


def is_pipeline(obj: Any) -> bool:
    """A diffusers-style pipeline: callable, not a module, with a denoiser component."""
    return (
        not isinstance(obj, torch.nn.Module)
        and callable(obj)
        and any(isinstance(getattr(obj, a, None), torch.nn.Module) for a in ("unet", "transformer", "prior"))
    )


def _is_t5_like(tok: Any) -> bool:
    return tok is not None and "clip" not in type(tok).__name__.lower()


def text_layout(pipe: Any, args: dict[str, Any]) -> tuple[tuple[tuple[int, int, int], ...], tuple[Any, ...]]:
    """(layout, tokenizers): which tokenizer gives the text tokens the denoiser attends to, and where.

    Each layout entry is (tokenizer index, first text position, length). SD1/2 and SDXL attend to the
    77 CLIP positions (SDXL's two CLIP encoders share them); SD3's joint blocks to the 77 CLIP
    positions followed by the T5 positions; Flux's to the T5 positions only (CLIP gives only the pooled
    vector); PixArt, Sana and video pipelines to their one encoder's positions.
    """
    names = [n for n in ("tokenizer", "tokenizer_2", "tokenizer_3") if getattr(pipe, n, None) is not None]
    toks = tuple(getattr(pipe, n) for n in names)
    if not toks:
        return (), ()
    max_seq = args.get("max_sequence_length")

    def length(i: int) -> int:
        n = getattr(toks[i], "model_max_length", 77)
        return int(n) if isinstance(n, int) and n < 100_000 else 77

    if "tokenizer_3" in names:  # SD3: CLIP positions, then T5
        clip_len = int(getattr(pipe, "tokenizer_max_length", length(0)))
        t5 = names.index("tokenizer_3")
        return ((0, 0, clip_len), (t5, clip_len, int(max_seq or length(t5)))), toks
    if "tokenizer_2" in names and _is_t5_like(pipe.tokenizer_2):  # Flux: T5 only
        t5 = names.index("tokenizer_2")
        return ((t5, 0, int(max_seq or length(t5))),), toks
    first = 0
    return ((first, 0, int(max_seq or length(first))),), toks


def _as_list(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def _pipeline_cfg(pipe: Any, guidance_scale: Any) -> bool | None:
    """The pipeline's own answer to "is the denoiser batch [uncond, cond]?" for this guidance scale."""
    prop = getattr(type(pipe), "do_classifier_free_guidance", None)
    if isinstance(prop, property) and prop.fget is not None and guidance_scale is not None:
        missing = object()
        old = pipe.__dict__.get("_guidance_scale", missing)
        pipe.__dict__["_guidance_scale"] = guidance_scale
        try:
            return bool(prop.fget(pipe))
        except Exception:  # a property that needs more state than we set: fall back to the scale
            pass
        finally:
            if old is missing:
                pipe.__dict__.pop("_guidance_scale", None)
            else:
                pipe.__dict__["_guidance_scale"] = old
    return None  # unknown: the denoiser's first batch tells (Flux's guidance_scale is an embedding, not CFG)


class PipelineHook:
    """Wraps one pipeline's calls into generations for an attachment."""

    def __init__(self, pipe: Any, attachment: Attachment) -> None:
        self.pipe = pipe
        self.attachment = attachment
        self.original_class = type(pipe)
        self.signature = inspect.signature(self.original_class.__call__)
        self.share_latents: tuple[int, ...] | None = None

    def install(self) -> Callable[[], None]:
        """Swap in the tracing subclass; returns the undo (restores the very same class)."""
        if self.pipe in _HOOKS:
            raise ConfigError(f"this {self.original_class.__name__} is already traced; detach the other tracer first")
        self.pipe.__class__ = _subclass(self.original_class)
        _HOOKS[self.pipe] = self

        def undo() -> None:
            if _HOOKS.get(self.pipe) is self:
                del _HOOKS[self.pipe]
            if type(self.pipe) is _SUBCLASSES.get(self.original_class):
                self.pipe.__class__ = self.original_class

        return undo

    # -- one call ----------------------------------------------------------------------------------
    def call(self, original: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            bound = self.signature.bind(self.pipe, *args, **kwargs)
        except TypeError:
            return original(self.pipe, *args, **kwargs)  # let the pipeline raise its own error
        full = dict(bound.arguments)
        for name, param in self.signature.parameters.items():
            if name not in full and param.default is not inspect.Parameter.empty:
                full[name] = param.default
        att = self.attachment
        prompts = _as_list(full.get("prompt"))
        per = next((int(full[k]) for k in _PER_PROMPT if isinstance(full.get(k), int)), 1)
        negatives = _as_list(full.get("negative_prompt"))
        if prompts is not None:
            if negatives is None:
                negatives = [""] * len(prompts)
            elif len(negatives) == 1 and len(prompts) > 1:
                negatives = negatives * len(prompts)
            prompts = [p for p in prompts for _ in range(per)]
            negatives = [n for n in negatives for _ in range(per)]
        layout, toks = text_layout(self.pipe, full)
        draft = {
            "prompts": tuple(prompts) if prompts is not None else None,
            "negative_prompts": tuple(negatives) if negatives is not None else None,
            "tokenizers": toks,
            "text_layout": layout,
            "cfg": _pipeline_cfg(self.pipe, full.get("guidance_scale")),
            "num_steps": full.get("num_inference_steps") if isinstance(full.get("num_inference_steps"), int) else None,
        }
        n = len(prompts) if prompts is not None else None
        group = att.group_for(n)
        if group is not None and per > 1:
            raise ConfigError(
                "an edit group is one image per prompt (source first, then edited prompts); "
                f"got num_images_per_prompt={per}",
                field="num_images_per_prompt",
            )
        draft["group"] = group
        latents = full.get("latents")
        self.share_latents = group if (group is not None and latents is None) else None
        if group is not None and isinstance(latents, torch.Tensor) and latents.shape[0] == n and n:
            rows = latents[list(group)]
            if not all(torch.equal(rows[0], r) for r in rows[1:]):
                warnings.warn(
                    "attntrace: the images of this edit group start from different latents; prompt-to-prompt "
                    "and MasaCtrl share one start latent (pass one latent expanded to the group, or no latents)",
                    RuntimeWarning,
                    stacklevel=3,
                )
        if att.wants_latents():
            self._compose_callback(bound)
        att.begin_generation(draft)
        output = None
        try:
            output = original(*bound.args, **bound.kwargs)
        finally:
            self.share_latents = None
            att.end_generation(_images(output) if output is not None else None, failed=output is None)
        return output

    def _compose_callback(self, bound: inspect.BoundArguments) -> None:
        params = self.signature.parameters
        name = type(self.pipe).__name__
        if "callback_on_step_end" not in params:
            raise ConfigError(
                f"{name} has no callback_on_step_end, which observers that change latents (local_blend) need; "
                "use a pipeline that has one or leave those observers out",
                field="pipeline",
            )
        user = bound.arguments.get("callback_on_step_end")
        user_inputs = getattr(user, "tensor_inputs", None)
        if user_inputs is None:
            user_inputs = bound.arguments.get("callback_on_step_end_tensor_inputs")
        if user_inputs is None:
            default = params.get("callback_on_step_end_tensor_inputs")
            user_inputs = default.default if default is not None and isinstance(default.default, list) else ["latents"]
        user_inputs = list(user_inputs)
        att = self.attachment

        def on_step_end(pipe: Any, i: int, t: Any, cb_kwargs: dict[str, Any]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            latents = cb_kwargs.get("latents")
            if isinstance(latents, torch.Tensor):
                new = att.latents_step_end(i, latents)
                if new is not None:
                    cb_kwargs["latents"] = new
                    out["latents"] = new
            if user is not None:
                mine = {k: cb_kwargs[k] for k in user_inputs if k in cb_kwargs}
                got = user(pipe, i, t, mine)
                if got:
                    out.update(got)
            return out

        bound.arguments["callback_on_step_end"] = on_step_end
        bound.arguments["callback_on_step_end_tensor_inputs"] = sorted({*user_inputs, "latents"}, key=str)

    def shared(self, latents: Any) -> Any:
        """Make every image of the edit group start from the source image's latents."""
        group = self.share_latents
        if group is None:
            return latents
        first = latents[0] if isinstance(latents, tuple) else latents
        if not isinstance(first, torch.Tensor) or first.shape[0] < max(group) + 1:
            return latents
        idx = list(range(first.shape[0]))
        for g in group:
            idx[g] = group[0]
        first = first[idx]
        return (first, *latents[1:]) if isinstance(latents, tuple) else first


def _images(output: Any) -> Any:
    for attr in ("images", "frames", "videos"):
        value = getattr(output, attr, None)
        if value is not None:
            return value
    if isinstance(output, tuple) and output:
        return output[0]
    return None


def _subclass(cls: type) -> type:
    sub = _SUBCLASSES.get(cls)
    if sub is not None:
        return sub
    original_call = cls.__call__

    @functools.wraps(original_call)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        hook = _HOOKS.get(self)
        if hook is None or not hook.attachment.active:
            return original_call(self, *args, **kwargs)
        return hook.call(original_call, args, kwargs)

    namespace: dict[str, Any] = {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
    original_prepare = getattr(cls, "prepare_latents", None)
    if callable(original_prepare):

        @functools.wraps(original_prepare)
        def prepare_latents(self: Any, *args: Any, **kwargs: Any) -> Any:
            out = original_prepare(self, *args, **kwargs)
            hook = _HOOKS.get(self)
            return hook.shared(out) if hook is not None else out

        namespace["prepare_latents"] = prepare_latents
    sub = type(cls.__name__, (cls,), namespace)
    _SUBCLASSES[cls] = sub
    return sub
