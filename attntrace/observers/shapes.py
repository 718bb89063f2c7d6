"""`shapes`: records the q/k/v/probs/output shapes of every call, without computing probabilities.

Keeps one row per distinct (site, call index, shapes) plus a call count: memory grows with the number
of sites, not with steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..core.call import AttentionCall
from ..core.observer import Observer

__all__ = ["Shapes"]


class ShapesParams(BaseModel):
    """Parameters of `shapes`."""

    model_config = ConfigDict(extra="forbid")
    print_table: bool = Field(default=False, description="print the table when the tracer detaches/saves")


class Shapes(Observer):
    """Per site: the shapes of query, key, value, probs and output, kind, and how many calls were seen."""

    name = "shapes"
    needs = frozenset()
    Params = ShapesParams

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.rows: dict[tuple[str, int, tuple[Any, ...]], dict[str, Any]] = {}

    def on_call(self, call: AttentionCall) -> None:
        q, k, v = call.query.shape, call.key.shape, call.value.shape
        shapes = (tuple(q), tuple(k), tuple(v))
        key = (call.site, call.index, shapes)
        row = self.rows.get(key)
        if row is None:
            self.rows[key] = {
                "site": call.site,
                "kind": call.kind,
                "index": call.index,
                "query": tuple(q),
                "key": tuple(k),
                "value": tuple(v),
                "probs": (q[0], q[1], q[2], k[2]),
                "output": (q[0], q[1], q[2], v[3]),
                "dtype": str(call.query.dtype).removeprefix("torch."),
                "calls": 1,
            }
        else:
            row["calls"] += 1

    def result(self) -> list[dict[str, Any]]:
        """One dict per distinct (site, index, shapes)."""
        return list(self.rows.values())

    def table(self) -> str:
        """A compact text table."""
        rows = self.result()
        if not rows:
            return "(no attention calls seen)"
        cols = ["site", "kind", "query", "key", "probs", "calls"]

        def fmt(v: Any) -> str:
            return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)

        cells = [[fmt(r[c]) for c in cols] for r in rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
        lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in cells]
        return "\n".join(lines)

    def save(self, directory: Path) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "shapes.json"
        path.write_text(json.dumps(self.result(), indent=1))
        if self.params.print_table:
            print(self.table())
        return [path]

    def close(self) -> None:
        self.rows.clear()
