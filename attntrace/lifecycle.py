"""The generation life cycle of an attachment: open, first forward, step-end latents, close.

A generation opens with what the pipeline call told (`PipelineHook`), with what the user said
(`tracer.generation(...)`) or, for a bare model attached with `generation_per_call=True`, at each
top-level call. Steps restart at 0. Observers get `on_generation_start` at the denoiser's first
forward, once the batch layout has been checked against the batch the denoiser really got, and
`on_generation_end` with the output images when the call returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .core.errors import AttachError, ConfigError
from .core.generation import Generation
from .core.observer import Observer

__all__ = ["GenerationLifecycle", "TracerGenerations"]


class GenerationLifecycle:
    """Mixed into `Attachment`: the generation bookkeeping (state lives on the tracer)."""

    tracer: Any  # the Tracer (typed loosely: tracer.py imports this module)
    active: bool
    generation: int  # the dispatch-cache counter of the attachment
    _step: int
    _last_timestep: Any
    per_call: bool = False
    force_group: bool | None = None

    def _init_lifecycle(self) -> None:
        self._pending: dict[str, Any] | None = None
        self.current: Generation | None = None

    # -- what the observers want ---------------------------------------------------------------
    def _observers(self) -> list[Observer]:
        disabled = getattr(self, "disabled", set())
        return [e.observer for e in self.tracer.entries if e.observer not in disabled]

    def wants_latents(self) -> bool:
        """Whether some observer changes latents at step ends (then the pipeline callback is hooked)."""
        return any(type(o).on_latents is not Observer.on_latents for o in self._observers())

    def group_for(self, images: int | None) -> tuple[int, ...] | None:
        """The edit group of a call with `images` images: source 0, then the others; None if not a group."""
        if self.force_group is False:
            return None
        wanted = self.force_group or any(o.group_editor for o in self._observers())
        if not wanted or images is None:
            return None
        if images < 2:
            if self.force_group:
                raise ConfigError("an edit group needs a source prompt and at least one edited prompt", field="prompt")
            return None
        return tuple(range(images))

    # -- open / first forward / close ----------------------------------------------------------
    def begin_generation(self, draft: dict[str, Any]) -> None:
        """Open a generation: steps restart at 0; observers hear of it at the first forward."""
        if self._pending is not None or self.current is not None:
            self.end_generation(None, failed=True)
        self._pending = dict(draft)
        self._step = -1
        self._last_timestep = None
        self.generation += 1

    def _first_forward(self, batch: int | None) -> None:
        draft, self._pending = self._pending, None
        assert draft is not None
        cfg = draft.get("cfg")
        prompts = draft.get("prompts")
        if prompts is None:
            n = batch // 2 if (batch and cfg and batch % 2 == 0) else (batch or 1)
            prompts = ("",) * n
        n = len(prompts)
        if cfg is None:  # the pipeline does not say: a batch of twice the images is [uncond, cond]
            cfg = batch is not None and batch == 2 * n
        if batch is not None and batch != (2 * n if cfg else n):
            if cfg and batch == n:
                warnings.warn(
                    "attntrace: this pipeline runs classifier-free guidance as separate forwards; each forward is "
                    "traced as its own step and every row counts as conditional",
                    RuntimeWarning,
                    stacklevel=4,
                )
                cfg = False
            elif not cfg and batch == 2 * n:
                cfg = True
        negatives = draft.get("negative_prompts") or ("",) * n
        gen = Generation(
            index=len(self.tracer.generations),
            prompts=tuple(prompts),
            negative_prompts=tuple(negatives),
            tokenizers=tuple(draft.get("tokenizers") or ()),
            cfg=cfg,
            num_steps=draft.get("num_steps"),
            group=draft.get("group"),
            text_layout=tuple(draft.get("text_layout") or ()),
        )
        self.current = gen
        self.tracer.generations.append(gen)
        self._notify("on_generation_start", gen)

    def start_if_pending(self, first: Any) -> None:
        """Called at each top-level forward start: opens a pending generation (or one per call)."""
        if self._pending is None and self.current is None and self.per_call:
            self.begin_generation({"cfg": False})
            self._step = -1
        if self._pending is not None:
            batch = int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() >= 1 else None
            self._first_forward(batch)

    def end_per_call(self) -> None:
        """Called at each top-level forward end: closes a per-call generation."""
        if self.per_call and self.current is not None:
            self.end_generation(None)

    def end_generation(self, images: Any | None, failed: bool = False) -> None:
        """Close the open generation: observers get its images and results are kept apart."""
        if self._pending is not None and not failed:
            self._first_forward(None)  # a generation that never reached the denoiser still opens and closes
        self._pending = None
        gen, self.current = self.current, None
        if gen is None:
            return
        if getattr(self.tracer.config, "step_by", "forward") == "timestep" and self._step >= 0 and self.active:
            self._step_end(self._step)  # type: ignore[attr-defined]
            self._last_timestep = None
            self._step = -1
        self._notify("on_generation_end", gen, images)
        self.tracer.keep_generation_results(gen)

    def latents_step_end(self, step: int, latents: torch.Tensor) -> torch.Tensor | None:
        """The step-end latents through every observer that changes them, in rule order."""
        changed = False
        for obs in self._observers():
            if type(obs).on_latents is Observer.on_latents:
                continue
            try:
                new = obs.on_latents(step, latents)
            except Exception as exc:
                self.observer_failed(obs, "(step-end latents)", step, exc)  # type: ignore[attr-defined]
                continue
            if new is not None:
                latents, changed = new, True
        return latents if changed else None

    def _notify(self, hook: str, *args: Any) -> None:
        for obs in self._observers():
            try:
                getattr(obs, hook)(*args)
            except Exception as exc:
                self.observer_failed(obs, f"({hook})", max(self._step, 0), exc)  # type: ignore[attr-defined]

    def replace_current(self, **changes: Any) -> Generation:
        """A copy of the current generation with `changes` (kept in the tracer's list too)."""
        if self.current is None:
            raise ConfigError("no generation is open")
        gen = dataclasses.replace(self.current, **changes)
        self.tracer.generations[-1] = gen
        self.current = gen
        return gen


class TracerGenerations:
    """Mixed into `Tracer`: the generations seen, per-generation results, `reset`, generation blocks."""

    entries: list[Any]
    generations: list[Generation]
    _generation_results: list[dict[str, Any]]
    _attachment: Any

    def results(self, generation: int | None = None) -> dict[str, Any]:
        """Each observer's `result()`, by label: now, or as it was at the end of generation `generation`.

        Observers that accumulate hold what they were asked to (per generation or across generations,
        by their own parameter); the tracer keeps each generation's results apart as they were when it
        ended (`generation_results()`).
        """
        if generation is None:
            return {e.label: e.observer.result() for e in self.entries}
        for kept in self._generation_results:
            if kept["generation"].index == generation:
                return dict(kept["results"])
        seen = [k["generation"].index for k in self._generation_results]
        raise ConfigError(f"no generation {generation} (generations seen: {seen or 'none'})", field="generation")

    def generation_results(self) -> list[dict[str, Any]]:
        """One `{"generation": Generation, "results": {label: result}}` per finished generation."""
        return [dict(k) for k in self._generation_results]

    def keep_generation_results(self, generation: Generation) -> None:
        """Snapshot every observer's result at the end of `generation` (called by the attachment)."""
        results = {e.label: e.observer.result() for e in self.entries}
        self._generation_results.append({"generation": generation, "results": results})

    def reset(self) -> None:
        """Forget generations, kept results and observer state without detaching; steps restart at 0."""
        self.generations.clear()
        self._generation_results.clear()
        for e in self.entries:
            e.observer.reset()
        att = self._attachment
        if att is not None:
            att._pending = None
            att.current = None
            att._step = -1
            att._last_timestep = None
            att.generation += 1

    @contextlib.contextmanager
    def generation(
        self,
        prompts: Sequence[str] = (),
        *,
        negative_prompts: Sequence[str] = (),
        tokenizers: Sequence[Any] = (),
        cfg: bool = False,
        num_steps: int | None = None,
        group: Sequence[int] | None = None,
        text_layout: Sequence[tuple[int, int, int]] = (),
    ) -> Iterator[None]:
        """Mark the model calls inside the block as one generation (for bare models; pipelines do it alone).

        ```python
        with tracer.attach(unet), tracer.generation(["a cat", "a dog"], tokenizers=[tok], cfg=True, group=[0, 1]):
            for t in timesteps: ...   # steps restart at 0
        ```
        """
        att = self._attachment
        if att is None:
            raise AttachError("attach the tracer before opening a generation")
        att.begin_generation({
            "prompts": tuple(prompts) or None, "negative_prompts": tuple(negative_prompts) or None,
            "tokenizers": tuple(tokenizers), "cfg": cfg, "num_steps": num_steps,
            "group": tuple(group) if group is not None else None, "text_layout": tuple(text_layout),
        })  # fmt: skip
        ok = False
        try:
            yield
            ok = True
        finally:
            att.end_generation(None, failed=not ok)

    @contextlib.contextmanager
    def edit_group(self, enabled: bool = True) -> Iterator[None]:
        """Inside the block every pipeline call is (or, with False, is not) an edit group: image 0 is the
        source, the others are edited, and all start from the source's latents. Without it, a call with
        two or more prompts is a group when some observer is a group editor (replace, reweight...)."""
        att = self._attachment
        if att is None:
            raise AttachError("attach the tracer before marking edit groups")
        old, att.force_group = att.force_group, enabled
        try:
            yield
        finally:
            att.force_group = old
