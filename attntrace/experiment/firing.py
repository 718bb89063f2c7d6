"""Which rules fired: per item, how many attention calls reached each rule's observer.

A rule whose sites or steps are never reached observes nothing; the runner warns at the end of a run,
naming the rule (`trace.rules.N`) and what the run did reach, instead of leaving an empty folder.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FiringCounter", "never_fired_warnings"]


class FiringCounter:
    """Counts the calls each observer of a tracer receives (wraps the instances' `on_call`)."""

    def __init__(self, tracer: Any) -> None:
        #: calls per rule, in the tracer's rule order (keys "0", "1", ...: JSON-able)
        self.counts: dict[str, int] = {}
        for i, obs in enumerate(tracer.observers.values()):
            key = str(i)
            self.counts[key] = 0
            inner = obs.on_call

            def counted(call: Any, _inner: Any = inner, _key: str = key) -> None:
                self.counts[_key] += 1
                _inner(call)

            obs.on_call = counted  # an instance attribute: the class and other instances are untouched


def never_fired_warnings(exp: Any, fired: dict[str, int], items: int, steps_seen: int | None) -> list[str]:
    """One line per rule that fired in none of `items` items (fired: calls per rule index, summed)."""
    out = []
    for i, rule in enumerate(exp.trace.rules):
        if fired.get(str(i), 0) > 0 or items == 0:
            continue
        where = f"match {rule.match!r}, kind {rule.kind!r}, steps {rule.step_selector.describe()}"
        reached = f"; the items ran steps 0..{steps_seen - 1}" if steps_seen else ""
        out.append(
            f"trace.rules.{i} ({rule.label}: {where}) never fired in {items} item(s): no attention call at its "
            f"sites and steps{reached}; check `attntrace sites` and the rule's steps"
        )
    return out
