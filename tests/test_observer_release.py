"""Built-in observers holding tensors (heatmap, save, stats) release them on `tracer.close()`: weak
references to everything they held are dead afterwards (nothing else keeps them: not the calls, the
bindings, the attachment or the save writer thread)."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tiny import run, sd15_unet

from attntrace import Tracer
from attntrace.observers.save import Save


def held_arrays(obj: Any, seen: set[int] | None = None) -> list[Any]:
    """Every tensor / ndarray reachable from an observer's attributes (dicts, lists, tuples)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return [obj]
    if isinstance(obj, dict):
        return [a for v in obj.values() for a in held_arrays(v, seen)]
    if isinstance(obj, (list, tuple)):
        return [a for v in obj for a in held_arrays(v, seen)]
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("attntrace.observers"):
        return held_arrays(vars(obj), seen)
    return []


class WatchedSave(Save):
    """`save` that keeps weak references to every tensor it queued for writing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.watched: list[weakref.ref[torch.Tensor]] = []

    def _write(self, item: dict[str, Any]) -> None:
        self.watched += [weakref.ref(t) for t in item["tensors"].values()]
        super()._write(item)


def test_heatmap_save_stats_release_on_close(tmp_path: Path) -> None:
    model, inputs = sd15_unet()
    tracer = Tracer(output_dir=tmp_path)
    heat = tracer.add("heatmap", match="*attn2", kind="cross")
    stats = tracer.add("stats", match="*attn1", kind="self")
    saver = tracer.add(WatchedSave(tensors=["probs", "query"], queue_size=2), match="*attn2")
    with tracer.attach(model):
        run(model, inputs)
        run(model, inputs)
    heat.set_image(np.zeros((16, 16, 3), np.uint8))
    held = {"heatmap": held_arrays(heat), "stats": held_arrays(stats)}
    assert held["heatmap"] and stats.rows  # they really hold something
    refs = [weakref.ref(a) for arrays in held.values() for a in arrays]
    del held
    saver.flush()
    n_cross = sum(s.kind == "cross" for s in tracer.sites(model))
    assert len(saver.watched) == 2 * 2 * n_cross  # 2 tensors x 2 steps x cross-attention sites
    # (the writer drops each file's tensors once written; close() also ends the thread holding the last)
    tracer.close()
    gc.collect()
    assert all(r() is None for r in refs), sum(r() is not None for r in refs)
    assert all(r() is None for r in saver.watched), sum(r() is not None for r in saver.watched)
    assert heat.sums == {} and stats.rows == [] and held_arrays(saver) == []
