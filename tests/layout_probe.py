"""Helpers for the layout tests: record every call's queries, keys and layout, and find changed token rows."""

from __future__ import annotations

from typing import Any

import torch

from attntrace import Observer, Tracer

Record = tuple[str, int, torch.Tensor, torch.Tensor, Any]


class KeyRecorder(Observer):
    """Keeps every call's site, index, queries, keys and layout."""

    needs = frozenset({"query", "key"})

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Record] = []

    def on_call(self, call: Any) -> None:
        self.calls.append((call.site, call.index, call.query.detach().clone(), call.key.detach().clone(), call.layout))


def record_calls(model: torch.nn.Module, inputs: dict[str, Any]) -> list[Record]:
    """Run `model(**inputs)` once, traced, and return every call's record."""
    tracer = Tracer()
    rec = tracer.add(KeyRecorder())
    with tracer.attach(model), torch.no_grad():
        model(**inputs)
    return rec.calls


def changed_rows(a: torch.Tensor, b: torch.Tensor) -> set[int]:
    """Token rows (axis -2) that differ anywhere over batch, heads and features."""
    if a.shape != b.shape:
        return set()
    diff = (a.float() - b.float()).abs().amax(dim=(0, 1, 3))
    scale = a.float().abs().amax().clamp_min(1e-6)
    return {int(i) for i in torch.nonzero(diff > 1e-5 * scale).flatten()}
