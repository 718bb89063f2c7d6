"""`Tracer` and the attachment life cycle: attach → count steps → dispatch calls → detach (always).

A tracer holds ordered rules (observer × glob patterns × kinds × steps). `attach(model)` finds the
model's sites through the framework adapters, installs interception only at sites some rule
matches, and counts top-level forwards as steps. Detaching restores the very same objects; it runs
on leaving the `with` block, on `detach()` (idempotent), when attaching fails half-way, and when an
observer raises under `on_error: raise`.

Adapters see an attachment only through `attntrace.tracing.binding` (`SiteBinding`, `Session`); this
module is the facade on top and nothing below imports it. (It holds both `Tracer` and `Attachment`,
about 550 lines: they share the attach/detach life cycle and the step counting.)
"""

from __future__ import annotations

import inspect
import logging
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import registry
from .adapters import Adapter, adapters_for
from .config import TraceConfig
from .core.errors import AttachError, ConfigError, OutputWriteError, SelectionError, describe_failure, write_failure
from .core.generation import Generation
from .core.messages import EMPTY_GLOB, unknown_needs
from .core.observer import NEEDS, Observer
from .core.selection import (
    StepSelector,
    closest_sites,
    kind_matches,
    match_sites,
    pattern_matches,
    probs_layout_refusal,
    validate_kinds,
)
from .core.site import Site
from .lifecycle import GenerationLifecycle, TracerGenerations
from .pipeline import PipelineHook, is_pipeline
from .tracing.binding import RuleEntry, SiteBinding

__all__ = ["Attachment", "RuleEntry", "Tracer", "find_sites", "resolve_model"]

log = logging.getLogger("attntrace")

_attached: weakref.WeakKeyDictionary[torch.nn.Module, Attachment] = weakref.WeakKeyDictionary()
_attached_lock = threading.Lock()

_INPUTS = frozenset({"query", "key", "value"})
_DENOISER_ATTRS = ("unet", "transformer", "prior", "decoder", "model")


def resolve_model(model: Any) -> torch.nn.Module:
    """The module to trace: the model itself, or a pipeline's denoiser (`unet`, `transformer`...).

    A `torch.compile` wrapper (`OptimizedModule`) is traced through the module it wraps, so site names are the
    model's own (not `_orig_mod.`-prefixed) and the compiled wrapper picks the interception up when it recompiles.
    """
    if isinstance(model, torch.nn.Module):
        return _uncompiled(model)
    for attr in _DENOISER_ATTRS:
        sub = getattr(model, attr, None)
        if isinstance(sub, torch.nn.Module):
            return _uncompiled(sub)
    raise AttachError(
        f"cannot trace a {type(model).__name__}: pass a torch.nn.Module or a pipeline with a "
        f"'unet' or 'transformer' component"
    )


def _uncompiled(module: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(inner, torch.nn.Module) and type(module).__name__ == "OptimizedModule" else module


def find_sites(model: Any) -> list[Site]:
    """Every attention site of `model` that some adapter can trace, in module order."""
    module = resolve_model(model)
    return [site for site, _ in _claimed_sites(module, adapters_for(module))]


def _claimed_sites(module: torch.nn.Module, adapters: Sequence[Adapter]) -> list[tuple[Site, Adapter]]:
    # A module found by an earlier adapter is not claimed by a later one.
    seen: set[int] = set()
    claimed: list[tuple[Site, Adapter]] = []
    for adapter in adapters:
        for site in adapter.find_sites(module):
            if id(site.module) not in seen:
                seen.add(id(site.module))
                claimed.append((site, adapter))
    if not claimed:
        # Nothing traceable: list attention-looking modules with the reason they cannot be traced.
        for adapter in adapters:
            for site in adapter.find_untraceable(module):
                if id(site.module) not in seen:
                    seen.add(id(site.module))
                    claimed.append((site, adapter))
    return claimed


class Attachment(GenerationLifecycle):
    """A tracer attached to one model: sites, bindings, step counter, generations. A context manager."""

    def __init__(self, tracer: Tracer, model: torch.nn.Module, sites: list[Site]) -> None:
        self.tracer = tracer
        self.model = model
        self.sites = sites
        self.bindings: dict[str, SiteBinding] = {}
        self.active = False
        self.generation = 0
        self.disabled: set[Observer] = set()
        self.timestep: Any = None
        self.root_hw: tuple[int, int] | None = None
        self._step = -1
        self._undos: list[Callable[[], None]] = []
        self._lock = threading.RLock()
        self._timestep_index: int | None = None
        self._last_timestep: Any = None
        self._forward_depth = 0
        self._init_lifecycle()

    @property
    def step(self) -> int:
        """Index of the current top-level forward (or timestep) since attach, from 0."""
        return max(self._step, 0)

    @property
    def traced_sites(self) -> list[str]:
        """Names of the sites where interception is installed."""
        return list(self.bindings)

    @property
    def output_dir(self) -> Path | None:
        """Where observers may write (the tracer's `output_dir`)."""
        return self.tracer.output_dir

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # -- step counting ---------------------------------------------------------------------------
    def _install_step_hooks(self) -> None:
        model = self.model
        try:
            params = list(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            params = []
        for name in ("timestep", "timesteps", "t"):
            if name in params:
                self._timestep_index = params.index(name)
                self._timestep_name = name
                break
        # The step hooks run outside any compiled graph: compiled, the counter they change would be a
        # guard and every step would recompile (`torch.compile(model)` calls them as separate frames).
        pre = model.register_forward_pre_hook(torch.compiler.disable(self._on_forward_start), with_kwargs=True)
        post = model.register_forward_hook(torch.compiler.disable(self._on_forward_end), always_call=True)
        self._undos.append(pre.remove)
        self._undos.append(post.remove)

    def _on_forward_start(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._forward_depth += 1
        if self._forward_depth > 1:
            return
        t = None
        if self._timestep_index is not None:
            t = kwargs.get(self._timestep_name)
            if t is None and len(args) > self._timestep_index:
                t = args[self._timestep_index]
        first = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        if isinstance(first, torch.Tensor) and first.dim() >= 4:
            self.root_hw = (int(first.shape[-2]), int(first.shape[-1]))
        if self.active:
            self.start_if_pending(first)
        if self.tracer.config.step_by == "timestep" and self._step >= 0 and _same_timestep(t, self._last_timestep):
            return
        if self.tracer.config.step_by == "timestep" and self._step >= 0:
            self._step_end(self._step)
        self._step += 1
        self.timestep = t
        self._last_timestep = t

    def _on_forward_end(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._forward_depth = max(0, self._forward_depth - 1)
        if self._forward_depth == 0 and self.tracer.config.step_by == "forward" and self.active:
            self._step_end(self.step)
        if self._forward_depth == 0 and self.active:
            self.end_per_call()

    def _step_end(self, step: int) -> None:
        self._account_skips(step)
        for entry in self.tracer.entries:
            if entry.observer in self.disabled:
                continue
            try:
                entry.observer.on_step_end(step)
            except Exception as exc:
                self.observer_failed(entry.observer, "(step end)", step, exc)

    def _account_skips(self, step: int) -> None:
        """Sites due at `step` whose attention did not run (cached or skipped blocks): record and tell observers."""
        for binding in self.bindings.values():
            if binding.ran_at == step:
                continue
            due = [e.observer for e in binding.entries if step in e.steps and e.observer not in self.disabled]
            if not due:
                continue
            binding.skipped_steps.append(step)
            for observer in due:
                try:
                    observer.on_skip(binding.site.name, step)
                except Exception as exc:
                    self.observer_failed(observer, binding.site.name, step, exc)

    def activity(self) -> dict[str, dict[str, Any]]:
        """Per traced site: steps at which it ran, and the steps at which it was due but ran no attention."""
        return {name: {"steps_ran": b.steps_ran, "steps_skipped": len(b.skipped_steps),
                       "skipped_steps": list(b.skipped_steps)} for name, b in self.bindings.items()}  # fmt: skip

    # -- failure policy --------------------------------------------------------------------------
    def observer_failed(self, observer: Observer, site: str, step: int, exc: Exception) -> None:
        """Apply `on_error`: detach and re-raise, or warn once and disable the observer."""
        label = self.tracer.label_of(observer)
        where = f"observer {label!r} failed at site {site!r}, step {step}"
        if self.tracer.config.on_error == "warn":
            self.disabled.add(observer)
            self.generation += 1
            warnings.warn(f"attntrace: {where}: {type(exc).__name__}: {exc}; observer disabled", RuntimeWarning,
                          stacklevel=2)  # fmt: skip
            log.warning("%s: %s: %s; observer disabled", where, type(exc).__name__, exc)
            return
        self.detach()
        exc.add_note(f"attntrace: {where} (the tracer was detached; the model is unpatched)")
        raise exc

    # -- detach ----------------------------------------------------------------------------------
    def detach(self) -> None:
        """Undo everything attach did, in reverse order. Safe to call more than once."""
        with self._lock:
            if not self._undos and not self.active:
                return
            if self.active and self.tracer.config.step_by == "timestep" and self._step >= 0:
                self.active = False
                self._step_end(self._step)
            self.active = False
            self.generation += 1
            errors = []
            while self._undos:
                undo = self._undos.pop()
                try:
                    undo()
                except Exception as exc:  # keep undoing the rest
                    errors.append(exc)
            with _attached_lock:
                if _attached.get(self.model) is self:
                    del _attached[self.model]
            if self.tracer._attachment is self:
                self.tracer._attachment = None
                self.tracer._activity = self.activity()
            if errors:
                raise AttachError(f"detach could not undo everything: {errors[0]!r}") from errors[0]


def _same_timestep(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return False
    try:
        ta = torch.as_tensor(a).flatten()
        tb = torch.as_tensor(b).flatten()
        return ta.shape == tb.shape and bool(torch.equal(ta.cpu(), tb.cpu()))
    except (TypeError, RuntimeError):
        return False


class Tracer(TracerGenerations):
    """Runs observers on the attention calls of a model.

    ```python
    tracer = Tracer("trace.yaml")                      # a TraceConfig, dict, YAML path/text, or None
    tracer.add(MyObserver(), match="up_blocks.*.attn2", kind="cross")
    with tracer.attach(unet):
        unet(latents, t, encoder_hidden_states=emb)
    tracer.results()
    ```
    """

    def __init__(
        self,
        config: TraceConfig | dict[str, Any] | str | Path | None = None,
        *,
        output_dir: str | Path | None = None,
    ) -> None:
        self.config = TraceConfig.coerce(config)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.entries: list[RuleEntry] = []
        self._attachment: Attachment | None = None
        self._activity: dict[str, dict[str, Any]] = {}
        #: The generations seen since attach or `reset()`, in order.
        self.generations: list[Generation] = []
        self._generation_results: list[dict[str, Any]] = []
        for i, rule in enumerate(self.config.rules):
            cls = registry.get(rule.use)
            observer = cls(cls.validate_params(rule.with_, field=f"rules.{i}.with"))
            self._add_entry(observer, rule.patterns, rule.kinds, rule.step_selector, rule.label)

    # -- building --------------------------------------------------------------------------------
    def add(
        self,
        observer: Observer | str | type[Observer],
        match: str | Sequence[str] = "*",
        kind: str | Sequence[str] = "any",
        steps: Any = None,
        *,
        name: str | None = None,
        **params: Any,
    ) -> Observer:
        """Add an observer (an instance, a class, or a registered name with `**params`); returns it."""
        if self._attachment is not None:
            raise AttachError("add observers before attaching (detach first)")
        if isinstance(observer, str):
            observer = registry.get(observer)(**params)
        elif isinstance(observer, type) and issubclass(observer, Observer):
            observer = observer(**params)
        elif not isinstance(observer, Observer):
            raise ConfigError(f"expected an Observer, its class or a registered name, got {type(observer).__name__}")
        elif params:
            raise ConfigError("params go to the observer's constructor when passing an instance", field="params")
        patterns = [match] if isinstance(match, str) else list(match)
        if not patterns or any(not isinstance(p, str) or not p.strip() for p in patterns):
            raise ConfigError(EMPTY_GLOB, field="match")
        kinds = validate_kinds(kind, "kind")
        self._add_entry(observer, patterns, kinds, StepSelector.parse(steps), name or observer.name or
                        type(observer).__name__.lower())  # fmt: skip
        return observer

    def _add_entry(
        self, observer: Observer, patterns: list[str], kinds: tuple[str, ...] | None, steps: StepSelector, label: str
    ) -> None:
        unknown = set(observer.needs) - NEEDS
        if unknown:
            raise ConfigError(unknown_needs(type(observer).__name__, unknown, NEEDS))
        taken = {e.label for e in self.entries}
        base, n = label, 2
        while label in taken:
            label, n = f"{base}#{n}", n + 1
        self.entries.append(RuleEntry(label, observer, patterns, kinds, steps))

    # -- inspection ------------------------------------------------------------------------------
    @property
    def observers(self) -> dict[str, Observer]:
        """Observers by label, in rule order."""
        return {e.label: e.observer for e in self.entries}

    def label_of(self, observer: Observer) -> str:
        """The label an observer is filed under."""
        return next((e.label for e in self.entries if e.observer is observer), type(observer).__name__)

    def sites(self, model: Any) -> list[Site]:
        """Every site of `model` with kind, module class and processor class (preview; changes nothing)."""
        return find_sites(model)

    def matches(self, model: Any) -> dict[str, list[str]]:
        """For each site of `model`, the labels of the rules that match it."""
        return {s.name: [e.label for e in self.entries if e.matches(s)] for s in find_sites(model)}

    def activity(self) -> dict[str, dict[str, Any]]:
        """Per traced site of the current (or last) attachment: `steps_ran`, `steps_skipped`, `skipped_steps`.

        A site that exists but ran no attention at a step its rules were due (a block cached by
        FirstBlockCache/TaylorSeer/MagCache, attention reused by PyramidAttentionBroadcast/FasterCache, a
        layer skipped by layer-skip guidance) is counted as skipped at that step; observers are told through
        `Observer.on_skip`. A site that does not exist is never here (its rule warns at attach).
        """
        att = self._attachment
        return att.activity() if att is not None else {k: dict(v) for k, v in self._activity.items()}

    def save(self, directory: str | Path | None = None) -> list[Path]:
        """Ask every observer to write its results under `directory/<label>/`.

        A failed write (disk full, file too large, read-only) is an `OutputWriteError` naming the observer.
        """
        root = Path(directory) if directory is not None else self.output_dir
        if root is None:
            raise ConfigError("no directory: pass one or set Tracer(output_dir=...)", field="output_dir")
        files: list[Path] = []
        for e in self.entries:
            where = root / e.label.replace("#", "_")
            try:
                files += e.observer.save(where)
            except Exception as exc:
                broken = write_failure(exc)
                if broken is None or isinstance(broken, OutputWriteError):
                    raise
                raise OutputWriteError(
                    f"observer {e.label!r} could not write its results under {where}: {describe_failure(broken)}",
                    path=str(where),
                ) from exc
        return files

    @property
    def attachment(self) -> Attachment | None:
        """The live attachment, if attached."""
        return self._attachment

    # -- life cycle ------------------------------------------------------------------------------
    def attach(self, model: Any, *, generation_per_call: bool = False) -> Attachment:
        """Install interception on `model` (or a pipeline's denoiser); returns the attachment.

        On a pipeline, each `pipe(...)` call is one generation (its prompts, tokenizers, CFG layout and
        images are learned from the call). On a bare model, `generation_per_call=True` makes each
        top-level call one generation; `tracer.generation(...)` marks one by hand.
        """
        if self._attachment is not None:
            raise AttachError(
                f"this tracer is already attached to a {type(self._attachment.model).__name__}; "
                "detach it first (tracer.detach() or leave the `with` block)"
            )
        module = resolve_model(model)
        with _attached_lock:
            other = _attached.get(module)
            if other is not None:
                raise AttachError(
                    f"this {type(module).__name__} is already traced by another tracer; detach that one first "
                    "or add these observers to it (tracers do not stack on one model)"
                )
        adapters = adapters_for(module)
        claimed = _claimed_sites(module, adapters)
        sites = [site for site, _ in claimed]
        owner = {site.name: adapter for site, adapter in claimed}
        if not any(s.traceable for s in sites):
            listed = "; ".join(f"{s.name} ({s.module_class}): {s.note}" for s in sites[:5])
            raise AttachError(
                f"{type(module).__name__} has no attention sites attntrace can trace (no diffusers attention "
                "processors, no transformers attention modules, no nn.MultiheadAttention, no F.sdpa call, no "
                "hand-written softmax attention)" + (f"; attention-like modules that cannot be traced: {listed}"
                                                     if listed else "")
            )
        plan = self._plan(sites)
        attachment = Attachment(self, module, sites)
        try:
            by_adapter: dict[int, list[SiteBinding]] = {}
            for site in sites:
                entries = plan.get(site.name)
                if entries:
                    binding = attachment.bindings[site.name] = SiteBinding(site, entries, attachment)
                    by_adapter.setdefault(id(owner[site.name]), []).append(binding)
            for adapter in adapters:
                group = by_adapter.get(id(adapter))
                if group:
                    undo = adapter.prepare(module, group)
                    if undo is not None:
                        attachment._undos.append(undo)
            attachment.active = True
            for b in attachment.bindings.values():
                attachment._undos.append(owner[b.site.name].install(b))
            attachment._install_step_hooks()
            attachment.per_call = generation_per_call
            if is_pipeline(model):
                attachment._undos.append(PipelineHook(model, attachment).install())
            self.generations.clear()
            self._generation_results.clear()
            with _attached_lock:
                _attached[module] = attachment
            self._attachment = attachment
            for e in self.entries:
                e.observer.output_dir = self.output_dir / e.label.replace("#", "_") if self.output_dir else None
                e.observer.on_attach(attachment)
        except BaseException:
            attachment.detach()
            self._attachment = None
            raise
        return attachment

    def _plan(self, sites: list[Site]) -> dict[str, list[RuleEntry]]:
        names = [s.name for s in sites]
        plan: dict[str, list[RuleEntry]] = {}
        for i, e in enumerate(self.entries):
            where = f"rules.{i}.match" if i < len(self.config.rules) else f"observer {e.label!r}"
            for p in e.patterns:
                hits = [s for s in sites if pattern_matches(p, s.name)]
                problem = None
                if not hits:
                    near = ", ".join(closest_sites(p, names)) or "(none)"
                    problem = f"{where}: pattern {p!r} matches no site; closest site names: {near}"
                elif e.kinds is not None and not any(kind_matches(e.kinds, s.kind) for s in hits):
                    got = sorted({s.kind for s in hits})
                    problem = (
                        f"{where}: pattern {p!r} matches {len(hits)} site(s) of kind {got}, "
                        f"none of kind {list(e.kinds)}"
                    )
                if problem:
                    if self.config.strict:
                        raise SelectionError(problem + " (set strict: false to only warn)")
                    warnings.warn("attntrace: " + problem, RuntimeWarning, stacklevel=3)
            matched = match_sites(e.patterns, e.kinds, sites)
            if "probs" in e.observer.needs or e.observer.edits:
                blocked = [s for s in matched if not s.probs]
                if blocked:
                    shown = ", ".join(s.name for s in blocked[:5]) + (" ..." if len(blocked) > 5 else "")
                    raise SelectionError(
                        f"{where}: observer {e.label!r} needs attention probabilities, which do not exist at "
                        f"{len(blocked)} linear-attention site(s): {shown}; exclude them (kind: [self, cross, joint])"
                    )
            if e.observer.needs_layout:
                unknown = [s for s in matched if s.layout.startswith("unknown")]
                if unknown:
                    shown = ", ".join(s.name for s in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
                    raise SelectionError(
                        f"{where}: observer {e.label!r} needs the token layout, which is {unknown[0].layout} at "
                        f"{len(unknown)} site(s): {shown}; exclude them from the match"
                    )
            if "probs" in e.observer.needs or e.observer.edits or e.observer.needs_layout:
                refusal = probs_layout_refusal(where, e.label, e.observer.probs_layouts, matched)
                if refusal:
                    raise SelectionError(refusal)
            # Sites that cannot give some tensors (hand-written attention): refuse now, not mid-forward.
            needs = set(e.observer.needs)
            lacking = [s for s in matched if needs & s.unavailable]
            fixed = [s for s in matched if not s.inputs_editable] if e.observer.edits and needs & _INPUTS else []
            for bad, why in ((lacking, "cannot provide"), (fixed, "cannot apply edits of")):
                if bad:
                    s0 = bad[0]
                    what = sorted(needs & (s0.unavailable if why == "cannot provide" else _INPUTS))
                    shown = ", ".join(s.name for s in bad[:5]) + (" ..." if len(bad) > 5 else "")
                    raise SelectionError(
                        f"{where}: observer {e.label!r} needs {what}, which {len(bad)} site(s) {why} "
                        f"({s0.module_class}: {s0.note or s0.adapter}): {shown}; exclude them from the match"
                    )
            for s in matched:
                plan.setdefault(s.name, []).append(e)
        return plan

    def detach(self) -> None:
        """Detach from the model if attached (idempotent)."""
        if self._attachment is not None:
            self._attachment.detach()
            self._attachment = None

    def close(self) -> None:
        """Detach and let every observer release what it holds."""
        self.detach()
        for e in self.entries:
            e.observer.close()

    def __repr__(self) -> str:
        rules = ", ".join(f"{e.label}@{'|'.join(e.patterns)}" for e in self.entries)
        return f"Tracer([{rules}], attached={self._attachment is not None})"
