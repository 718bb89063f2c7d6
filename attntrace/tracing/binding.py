"""The typed contract between the tracer and the adapters: `SiteBinding`, `Session`, `LayerCall`.

The tracer builds one `SiteBinding` per traced site (the site, the rules that matched it, the live
attachment seen as a `Session`) and hands it to the adapter that found the site. The adapter keeps
its own installation state (the original processor or forward, its interceptor) to itself; all it
reads from the binding is here. `SiteBinding.enter()` is the one step gate: every interception entry
asks it whether any observer is due before doing any work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..core.generation import Generation
from ..core.observer import Observer
from ..core.selection import StepSelector, kind_matches, pattern_matches
from ..core.site import Site

__all__ = ["LayerCall", "RuleEntry", "Session", "SiteBinding"]


class Session(Protocol):
    """What interception reads from a live attachment (`attntrace.tracer.Attachment` is one)."""

    model: torch.nn.Module
    active: bool
    generation: int
    disabled: set[Observer]
    timestep: Any
    root_hw: tuple[int, int] | None
    current: Generation | None

    @property
    def step(self) -> int: ...

    def observer_failed(self, observer: Observer, site: str, step: int, exc: Exception) -> None: ...


@dataclass(eq=False)
class RuleEntry:
    """A rule bound to its observer instance."""

    label: str
    observer: Observer
    patterns: list[str]
    kinds: tuple[str, ...] | None
    steps: StepSelector

    def matches(self, site: Site) -> bool:
        """Whether this rule selects `site` (kind and any pattern)."""
        return kind_matches(self.kinds, site.kind) and any(pattern_matches(p, site.name) for p in self.patterns)


@dataclass(eq=False)
class LayerCall:
    """One due call of a traced layer: its observers, step, and what the layer's arguments say.

    `image_len`/`text_len`/`image_hw` are the lengths the layer's own arguments show (hidden states,
    context), used by the adapter to resolve each kernel call's token layout; `kernel_calls` counts the
    kernel calls made so far inside this layer call (a layer may call the kernel more than once).
    """

    observers: Sequence[Observer]
    step: int
    timestep: Any
    image_len: int | None = None
    text_len: int | None = None
    image_hw: tuple[int, int] | None = None
    kernel_calls: int = 0


@dataclass(eq=False)
class SiteBinding:
    """One traced site: the site, the rules that matched it, and the attachment it belongs to."""

    site: Site
    entries: list[RuleEntry]
    attachment: Session
    _cache: tuple[int, int, list[Observer]] = field(default=(-1, -1, []), repr=False)
    # The steps at which attention ran here: a caching hook (FirstBlockCache, PAB, TaylorSeer...) or layer skip
    # runs none at some steps, and the tracer reports those as skipped (`Tracer.activity()`), not by silence.
    ran_at: int = field(default=-1, repr=False)
    steps_ran: int = 0
    skipped_steps: list[int] = field(default_factory=list)

    def mark_ran(self, step: int) -> None:
        """Record that a kernel call of this site reached its observers at `step`."""
        if step != self.ran_at:
            self.ran_at = step
            self.steps_ran += 1

    def observers_at(self, step: int) -> list[Observer]:
        """The observers that run at this site at `step` (empty: the layer runs untouched)."""
        att = self.attachment
        cached_step, generation, observers = self._cache
        if cached_step == step and generation == att.generation:
            return observers
        if not att.active:
            observers = []
        else:
            observers = [e.observer for e in self.entries if step in e.steps and e.observer not in att.disabled]
        self._cache = (step, att.generation, observers)
        return observers

    def enter(self, *, defer_compiled: bool = False) -> LayerCall | None:
        """The step gate: a `LayerCall` if some observer is due now, else None (run the layer untouched).

        `defer_compiled`: while `torch.compile` traces the layer, do not read the step (it would become
        a guard and every step would recompile); the kernel call is compiled into an op that picks the
        observers at run time (`attntrace.tracing.compiled`), so every rule's observer is passed on.
        """
        if defer_compiled and torch.compiler.is_compiling():
            observers = [e.observer for e in self.entries]
            return LayerCall(observers=observers, step=-1, timestep=None) if observers else None
        att = self.attachment
        step = att.step
        observers = self.observers_at(step)
        if not observers:
            return None
        return LayerCall(observers=observers, step=step, timestep=att.timestep)
