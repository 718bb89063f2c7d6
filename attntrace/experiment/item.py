"""One item of a run: a fresh tracer, the pipeline (or text model) call, and everything it leaves in
`items/<item-id>/`.

`image.png` (`image_<n>.png` for the other images of an edit group) is the generated image;
`<label>/...` is what each observer's `save()` wrote. An observer whose `save()` writes nothing has its
`result()` written instead (`result.json` + `result.safetensors`, see `attntrace.results`); one that
recorded nothing is listed as empty. Observers that define `set_context(prompt=..., tokens=..., item=...)`
receive the item's prompt and its tokens (as the pipeline's tokenizer splits it) before the item runs.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core.errors import OutputWriteError, SelectionError, describe_failure, write_failure
from .firing import FiringCounter
from .plan import Item
from .progress import Progress
from .spec import Experiment

__all__ = ["run_item"]


def run_item(
    exp: Experiment, loaded: tuple[Any, Any], it: Item, item_dir: Path, bar: Progress
) -> tuple[list[Path], dict[str, Any]]:
    """Trace one item with a fresh tracer (so observer results are per item) and save everything."""

    from ..tracer import Tracer

    model, tokenizer = loaded
    item_dir.mkdir(parents=True, exist_ok=True)
    tracer = Tracer(exp.trace, output_dir=item_dir)
    firing = FiringCounter(tracer)
    files: list[Path] = []
    extra: dict[str, Any] = {}
    tokens = _tokens(model, tokenizer, it.prompt)
    if tokens is not None:
        extra["tokens"] = tokens
        if it.group is not None:  # each image of an edit group has its own prompt's words
            extra["prompt_tokens"] = [_tokens(model, tokenizer, p) for p in it.group]
    for obs in tracer.observers.values():
        # Observers that label their output by prompt words may accept the context; optional API.
        setter = getattr(obs, "set_context", None)
        if callable(setter):
            setter(prompt=it.prompt, tokens=tokens, item=it.id)
    try:
        notes: list[str] = []
        with _rules_named_in_trace(notes), tracer.attach(model) as attachment, _maybe_no_grad():
            if exp.is_text_model:
                enc = tokenizer(it.prompt, return_tensors="pt").to(next(model.parameters()).device)
                outputs = model(**enc)
                hidden = getattr(outputs, "last_hidden_state", None)
                if hidden is not None:
                    from safetensors.torch import save_file

                    path = item_dir / "last_hidden_state.safetensors"
                    with _writing(path):
                        save_file({"last_hidden_state": hidden.float().cpu().contiguous()}, str(path))
                    files.append(path)
            else:
                files += _run_pipeline(exp, model, it, item_dir, bar, tracer)
                _hand_image_to_observers(tracer, files)
            extra["steps_seen"] = attachment.step + 1
        extra["fired"] = dict(firing.counts)
        files += tracer.save(item_dir)  # a failed write names the observer (OutputWriteError)
        empty: list[str] = []
        lossy: list[str] = []
        for label, obs in tracer.observers.items():
            where = item_dir / label.replace("#", "_")
            if any(where in f.parents for f in files):
                continue  # the observer saved itself
            with _writing(where / "result.json"):  # otherwise the runner keeps its result()
                written, lost = _persist_result(label, obs, where)
            lossy += [f"{label}: {p}" for p in lost]
            files += written
            if not written:
                empty.append(label)
    finally:
        tracer.close()
    if empty:
        extra["empty"] = empty
    if lossy:
        notes.append(f"result values stored only as their repr (not JSON or tensors): {', '.join(lossy[:5])}")
    if notes:
        extra["warnings"] = notes
    return files, extra


@contextlib.contextmanager
def _maybe_no_grad() -> Iterator[None]:
    import torch

    with torch.inference_mode():
        yield


def _persist_result(label: str, obs: Any, where: Path) -> tuple[list[Path], list[str]]:
    """Write `obs.result()` (JSON + safetensors) unless it is empty; returns (files, lossy value paths)."""
    from ..results import is_empty, write_result

    value = obs.result()
    if is_empty(value):
        return [], []
    cls = f"{type(obs).__module__}.{type(obs).__qualname__}"
    return write_result(value, where, label=label, observer_class=cls)


@contextlib.contextmanager
def _rules_named_in_trace(notes: list[str]) -> Iterator[None]:
    """Selection errors and warnings name their rule `rules.N...`; in an experiment file that field is
    `trace.rules.N...`. Warnings are collected into `notes` (printed once per run) instead of shown here."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            yield
    except SelectionError as exc:
        msg = str(exc)
        if msg.startswith("rules."):
            raise SelectionError("trace." + msg) from None
        raise
    for w in caught:
        text = str(w.message).removeprefix("attntrace: ")
        if issubclass(w.category, RuntimeWarning) and text.startswith("rules."):
            notes.append("trace." + text)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn a failed write of `path` into an `OutputWriteError` naming it (a partial file is removed)."""
    try:
        yield
    except Exception as exc:
        broken = write_failure(exc)
        if broken is None:
            raise
        with contextlib.suppress(OSError):
            path.unlink()
        raise OutputWriteError(f"cannot write {path}: {describe_failure(broken)}", path=str(path)) from exc


def _hand_image_to_observers(tracer: Any, files: list[Path]) -> None:
    """Observers drawing on the generated image (heat maps) get it before they save."""
    pngs = [f for f in files if f.suffix == ".png"]
    setters = [s for s in (getattr(o, "set_image", None) for o in tracer.observers.values()) if callable(s)]
    if not pngs or not setters:
        return
    from PIL import Image

    with Image.open(pngs[0]) as img:
        rgb = img.convert("RGB")
    for setter in setters:
        setter(rgb)


def _tokens(model: Any, tokenizer: Any, prompt: str) -> list[str] | None:
    """The prompt's tokens as the text encoder sees them (for per-word heat maps)."""
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        return None
    try:
        ids = tok(prompt)["input_ids"]
        return [str(t) for t in tok.convert_ids_to_tokens(ids)]
    except Exception:  # a tokenizer we do not understand: the run goes on without tokens
        return None


def _run_pipeline(
    exp: Experiment, pipe: Any, it: Item, item_dir: Path, bar: Progress, tracer: Any = None
) -> list[Path]:
    import inspect

    import torch

    inp = exp.inputs
    device = getattr(pipe, "device", torch.device("cpu"))
    gen_device = "cpu" if inp.generator_device == "cpu" or str(device) in ("cpu", "mps") else device
    kwargs: dict[str, Any] = {
        **inp.pipeline_kwargs,
        "prompt": list(it.group) if it.group is not None else it.prompt,
        "num_inference_steps": inp.steps,
        "guidance_scale": inp.guidance_scale,
        "generator": torch.Generator(gen_device).manual_seed(int(it.seed or 0)),
    }
    if it.negative_prompt is not None:
        # diffusers wants a list of negatives for a list of prompts (an edit group)
        kwargs["negative_prompt"] = it.negative_prompt if it.group is None else [it.negative_prompt] * len(it.group)
    if inp.height:
        kwargs["height"] = inp.height
    if inp.width:
        kwargs["width"] = inp.width
    params = inspect.signature(pipe.__call__).parameters
    if "callback_on_step_end" in params:

        def on_step_end(pipeline: Any, i: int, t: Any, cb_kwargs: dict[str, Any]) -> dict[str, Any]:
            bar.step()
            return {}

        kwargs["callback_on_step_end"] = on_step_end
    # Our own bar shows the steps; the pipeline's own bar setting is restored afterwards, so that a
    # pipeline passed in (the demo, notebooks) keeps showing diffusers' progress bar later.
    saved_bar = dict(getattr(pipe, "_progress_bar_config", None) or {})
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    group = tracer.edit_group() if (it.group is not None and tracer is not None) else contextlib.nullcontext()
    try:
        with group:  # an edit group: one batch from the source's start latents, source first
            result = pipe(**kwargs)
    finally:
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(**saved_bar)
    images = getattr(result, "images", None)
    if images is None and isinstance(result, tuple):
        images = result[0]
    files = []
    for n, img in enumerate(images or []):
        if hasattr(img, "save"):
            path = item_dir / ("image.png" if n == 0 else f"image_{n}.png")
            with _writing(path):
                img.save(path)
            files.append(path)
    return files
