"""The four checks every runtime feature gets, against independent oracles.

- transparency: a passive observer that reads probs and output leaves the pipeline's images
  `torch.equal` to the untraced run with the same feature;
- sites and steps: the (site, step) pairs the observer saw equal those where the attention kernel ran,
  recorded by `KernelOracle` (module pre-hooks naming the running attention module plus a torch-function
  mode catching `F.scaled_dot_product_attention`, with no attntrace involved); sites due but not run are
  reported skipped;
- edits: an editor halving the attention output at the sites matching a glob gives the images the oracle
  gives by halving the kernel's output at those sites itself;
- detach: every module of every component (hooks, processors, `_diffusers_hook` registries, accelerate
  hooks, peft state, parameters with their device, dtype and storage) is as it was.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from attntrace import Observer, Tracer, find_sites
from attntrace.core.call import AttentionCall
from attntrace.tracer import resolve_model

_SDPA = torch.nn.functional.scaled_dot_product_attention
_PRIMITIVE = (int, float, str, bool, type(None), torch.device, torch.dtype)


class Recorder(Observer):
    """Passive: reads probs, value and output; records each call's (site, step) and `probs @ v` error."""

    needs = frozenset({"value", "probs", "output"})

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[tuple[str, int]] = Counter()
        self.skipped: set[tuple[str, int]] = set()
        self.max_err = 0.0

    def on_call(self, call: AttentionCall) -> None:
        self.seen[(call.site, call.step)] += 1
        ref = call.probs @ call.value.float()
        err = float((ref - call.output.float()).abs().max()) / (1.0 + float(ref.abs().max()))
        self.max_err = max(self.max_err, err)

    def on_skip(self, site: str, step: int) -> None:
        self.skipped.add((site, step))


class Halve(Observer):
    """Editor: the attention output times 0.5."""

    needs = frozenset({"output"})
    edits = True

    def on_call(self, call: AttentionCall) -> None:
        call.output = call.output * 0.5


@dataclass
class KernelOracle:
    """Records which attention module ran the SDPA kernel at which denoiser forward, without attntrace.

    Module pre-hooks name the running attention module; a `TorchFunctionMode` catches the kernel.

    With `edit`, halves the kernel output at modules whose name matches that glob.
    """

    model: torch.nn.Module
    edit: str | None = None
    seen: Counter[tuple[str, int]] = field(default_factory=Counter)
    step: int = -1
    _stack: list[str] = field(default_factory=list)

    @contextmanager
    def active(self) -> Iterator[KernelOracle]:
        handles = [self.model.register_forward_pre_hook(lambda *_: self._next())]
        for site in find_sites(self.model):
            m, name = site.module, site.name
            handles.append(m.register_forward_pre_hook(lambda *_, n=name: self._enter(n)))
            handles.append(m.register_forward_hook(lambda *_: self._leave(), always_call=True))
        oracle = self

        class Mode(TorchFunctionMode):
            # A mode, not a patch of `F.scaled_dot_product_attention`: diffusers' own modes (layer skip) compare
            # the function they catch with that attribute, and see calls before this outer mode does.
            def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                out = func(*args, **(kwargs or {}))
                if func is _SDPA and oracle._stack:
                    oracle.seen[(oracle._stack[-1], oracle.step)] += 1
                    if oracle.edit is not None and fnmatch.fnmatchcase(oracle._stack[-1], oracle.edit):
                        out = out * 0.5
                return out

        def backend(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
            # diffusers' dispatcher backends that never reach F.sdpa (flex, flash, sage...): caught at the registry.
            def run(**kw: Any) -> torch.Tensor:
                out = fn(**kw)
                if oracle._stack:
                    oracle.seen[(oracle._stack[-1], oracle.step)] += 1
                    if oracle.edit is not None and fnmatch.fnmatchcase(oracle._stack[-1], oracle.edit):
                        out = out * 0.5
                return out

            return run

        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        registry = _AttentionBackendRegistry._backends
        saved = dict(registry)
        for name, fn in saved.items():
            if not getattr(name, "value", name).startswith(("native", "_native_")):
                registry[name] = backend(fn)
        try:
            with Mode():
                yield self
        finally:
            registry.update(saved)
            for h in handles:
                h.remove()

    def _next(self) -> None:
        self.step += 1

    def _enter(self, name: str) -> None:
        self._stack.append(name)

    def _leave(self) -> None:
        self._stack.pop()


def oracle_run(
    pipe: Any, call: Callable[[Any], torch.Tensor], edit: str | None = None
) -> tuple[torch.Tensor, KernelOracle]:
    oracle = KernelOracle(resolve_model(pipe), edit)
    with oracle.active():
        images = call(pipe)
    return images, oracle


# -- state snapshots -----------------------------------------------------------------------------
def _value(v: Any, ids: bool) -> Any:
    if isinstance(v, _PRIMITIVE):
        return v
    if isinstance(v, (list, tuple)) and all(isinstance(x, _PRIMITIVE) for x in v):
        return tuple(v)
    if isinstance(v, dict):
        return tuple((k, x if isinstance(x, _PRIMITIVE) else (id(x) if ids else type(x).__name__))
                     for k, x in v.items())  # fmt: skip
    return id(v) if ids else type(v).__name__


def module_state(module: torch.nn.Module, ids: bool = True) -> dict[str, Any]:
    """Everything attach/detach could touch on a module tree: by identity (`ids`) or by type, and scalars by value.

    Without `ids` the snapshot survives what a pipeline call itself recreates (model offload re-installs its
    accelerate hooks and moves weights at the end of every call), so traced and untraced runs compare.
    """
    state: dict[str, Any] = {}
    for name, m in module.named_modules():
        for k, v in vars(m).items():
            if k in ("_parameters", "_buffers", "_modules"):
                continue
            state[f"{name}:{k}"] = _value(v, ids)
        processor = getattr(m, "processor", None)
        if processor is not None:  # processors are never recreated by a run: always by identity
            state[f"{name}:processor"] = (id(processor), type(processor).__name__)
        registry = getattr(m, "_diffusers_hook", None)
        if registry is not None:
            state[f"{name}:_diffusers_hook.hooks"] = tuple((k, id(h) if ids else type(h).__name__)
                                                           for k, h in registry.hooks.items())  # fmt: skip
        for kind, tensors in (("param", m._parameters), ("buffer", m._buffers)):
            for k, p in tensors.items():
                if p is not None:
                    where = (id(p), p.data_ptr()) if ids else ()
                    state[f"{name}.{k}"] = (kind, *where, p.device, p.dtype, type(p).__name__)
    return state


def pipeline_state(pipe: Any, ids: bool = True) -> dict[str, Any]:
    """`module_state` of every component, plus the pipeline object's own attributes."""
    state: dict[str, Any] = {f"pipe:{k}": _value(v, ids) for k, v in vars(pipe).items()}
    for cname, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            state.update({f"{cname}/{k}": v for k, v in module_state(comp, ids).items()})
    return state


def diff(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    keys = sorted(set(before) | set(after))
    return [f"{k}: {before.get(k, '<absent>')!r} -> {after.get(k, '<absent>')!r}" for k in keys
            if before.get(k, "<absent>") != after.get(k, "<absent>")][:10]  # fmt: skip


# -- the whole check -----------------------------------------------------------------------------
@dataclass
class Outcome:
    """What one feature check measured (for asserts and the docs table)."""

    sites_seen: int
    calls_seen: int
    skipped: set[tuple[str, int]]
    steps: list[int]


def check_feature(
    pipe: Any,
    call: Callable[[Any], torch.Tensor],
    *,
    edit: str,
    match: str = "*",
    exact_edit: bool = True,
    probs_tol: float = 1e-5,
) -> Outcome:
    """Transparency, sites/steps, skips, edit and detach for `pipe` with its runtime feature already set up."""
    denoiser = resolve_model(pipe)
    ref = call(pipe)
    again, oracle = oracle_run(pipe, call)
    assert torch.equal(again, ref), "the oracle itself (or the feature) is not deterministic"
    assert oracle.seen, "the oracle saw no SDPA call: the feature bypasses F.sdpa"
    expected = Counter({k: v for k, v in oracle.seen.items() if fnmatch.fnmatchcase(k[0], match)})

    before = pipeline_state(pipe)
    shape = pipeline_state(pipe, ids=False)  # after an untraced run
    tracer = Tracer()
    rec = tracer.add(Recorder(), match=match)
    tracer.attach(pipe).detach()
    changed = diff(before, pipeline_state(pipe))
    assert not changed, changed
    with tracer.attach(pipe):
        out = call(pipe)
    assert torch.equal(out, ref), f"traced output differs by {float((out - ref).abs().max())}"
    assert rec.seen == expected, f"seen {sorted(rec.seen.items())[:6]} vs kernel calls {sorted(expected.items())[:6]}"
    assert rec.max_err < probs_tol, rec.max_err
    steps = list(range(oracle.step + 1))  # every denoiser forward, including ones where all attention was cached
    sites = [s.name for s in find_sites(denoiser) if fnmatch.fnmatchcase(s.name, match) and s.probs]
    expected_skips = {(s, t) for s in sites for t in steps if (s, t) not in oracle.seen}
    assert rec.skipped == expected_skips, (sorted(rec.skipped)[:6], sorted(expected_skips)[:6])
    activity = tracer.activity()
    for s in sites:
        assert activity[s]["steps_skipped"] == sum(1 for t in steps if (s, t) in expected_skips)
    changed = diff(shape, pipeline_state(pipe, ids=False))
    assert not changed, changed

    edited_ref, _ = oracle_run(pipe, call, edit=edit)
    assert not torch.equal(edited_ref, ref)
    editor = Tracer()
    editor.add(Halve(), match=edit)
    with editor.attach(pipe):
        edited = call(pipe)
    if exact_edit:
        assert torch.equal(edited, edited_ref), float((edited - edited_ref).abs().max())
    else:
        torch.testing.assert_close(edited, edited_ref, rtol=1e-4, atol=1e-5)
    changed = diff(shape, pipeline_state(pipe, ids=False))
    assert not changed, changed
    return Outcome(len({s for s, _ in rec.seen}), sum(rec.seen.values()), rec.skipped, steps)
