"""Reading experiment runs back: a run directory, one item's directory, or one observer's folder.

```python
run = attntrace.load_run("runs/cats")          # the folder `attntrace run` prints
item = run["p000-s0"]                            # or load_run("runs/cats/items/p000-s0")
item.prompt, item.observers                      # ['heatmap', 'stats']
item["stats"]                                    # rows of stats.csv as dicts
attntrace.load_run("runs/cats/items/p000-s0/save").get(site, step=0)   # tensors saved by `save`
```

What an observer folder gives (`read_observer_folder`):

| files | value |
|---|---|
| `manifest.json` with `entries` (the `save` observer) | `SavedRun` (tensors read on demand) |
| `result.json` (+ `result.safetensors`), written by the runner for observers without `save` | `result()` |
| `stats.csv` / `stats.parquet` | list of row dicts (numbers parsed) |
| `shapes.json` | list of row dicts |
| `heatmap.safetensors` | `{"maps": tensor, "count": int, "levels": [int]}` |
| `attnmaps.safetensors` | `{"maps", "present", "kind", "steps", "groups", "heads", "truncated"}` |
| anything else | the sorted list of files in the folder |
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .core.errors import RunError
from .core.messages import MANIFEST
from .runio import find_manifest, load_saved_run

__all__ = ["ItemResults", "RunResults", "load_run", "read_observer_folder"]



def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read {path}: {exc}") from None


def is_run_manifest(doc: Any) -> bool:
    """True for an experiment run's manifest (it lists items)."""
    return isinstance(doc, dict) and isinstance(doc.get("items"), dict)


def _number(text: str) -> Any:
    if text == "":
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            continue
    return text


def read_observer_folder(folder: str | Path) -> Any:
    """The results one observer left in `folder` (see the module doc for what each format gives)."""
    from .results import JSON_NAME, read_result

    d = Path(folder)
    if not d.is_dir():
        raise RunError(f"no observer folder at {d}")
    man = d / MANIFEST
    if man.is_file() and isinstance(read_json(man), dict) and "entries" in read_json(man):
        return load_saved_run(man)
    if (d / JSON_NAME).is_file():
        return read_result(d)
    if (d / "stats.csv").is_file():
        with (d / "stats.csv").open(newline="", encoding="utf-8") as fh:
            return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)]
    if (d / "stats.parquet").is_file():
        import pyarrow.parquet as pq

        return [{k: _number(str(v)) if k in ("batch", "head") else v for k, v in row.items()}
                for row in pq.read_table(d / "stats.parquet").to_pylist()]  # fmt: skip
    if (d / "shapes.json").is_file():
        return read_json(d / "shapes.json")
    if (d / "attnmaps.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(d / "attnmaps.safetensors"), framework="pt") as fh:
            out = {k: json.loads(v) for k, v in (fh.metadata() or {}).items()}
            out.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118 (not a dict)
        return out
    if (d / "heatmap.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(d / "heatmap.safetensors"), framework="pt") as fh:
            meta = fh.metadata() or {}
            out: dict[str, Any] = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
        if "count" in out:
            out["count"] = int(out["count"])
        out["levels"] = [int(x) for x in meta.get("levels", "").split(",") if x]
        return out
    return sorted(p for p in d.rglob("*") if p.is_file())


class ItemResults:
    """One item of a run: its record in the manifest and its observers' results (read on access)."""

    def __init__(self, directory: Path, item_id: str, record: dict[str, Any]) -> None:
        self.directory = directory
        self.id = item_id
        self.record = record

    @property
    def prompt(self) -> str | None:
        """The item's prompt (or text)."""
        return self.record.get("prompt")

    @property
    def status(self) -> str | None:
        """done, failed, interrupted, running or pending."""
        return self.record.get("status")

    @property
    def images(self) -> list[Path]:
        """The generated images (pipelines), in batch order."""
        return sorted(self.directory.glob("image*.png"), key=lambda p: (len(p.name), p.name))

    @property
    def observers(self) -> list[str]:
        """The observer folders of this item (labels with `#` written as `_`)."""
        if not self.directory.is_dir():
            return []
        return sorted(p.name for p in self.directory.iterdir() if p.is_dir() and not p.name.startswith("."))

    def __getitem__(self, label: str) -> Any:
        folder = self.directory / label.replace("#", "_")
        if not folder.is_dir():
            raise KeyError(f"item {self.id} has no results of observer {label!r} (it has: {self.observers})")
        return read_observer_folder(folder)

    def __repr__(self) -> str:
        return f"ItemResults({self.id!r}, status={self.status!r}, observers={self.observers})"


class RunResults:
    """An experiment run directory (`manifest.json` listing items), as written by `attntrace run`."""

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.directory = directory
        self.manifest = manifest

    @property
    def name(self) -> str:
        return str(self.manifest.get("name", self.directory.name))

    @property
    def items(self) -> dict[str, ItemResults]:
        """Every planned item by id (those not yet run have no results)."""
        return {
            iid: ItemResults(self.directory / "items" / iid, iid, rec) for iid, rec in self.manifest["items"].items()
        }

    @property
    def warnings(self) -> list[str]:
        """End-of-run warnings (rules that never fired, observers that recorded nothing)."""
        return list(self.manifest.get("warnings", []))

    def __getitem__(self, item_id: str) -> ItemResults:
        rec = self.manifest["items"].get(item_id)
        if rec is None:
            raise KeyError(f"run {self.name!r} has no item {item_id!r} (items: {list(self.manifest['items'])[:10]})")
        return ItemResults(self.directory / "items" / item_id, item_id, rec)

    def __iter__(self) -> Iterator[ItemResults]:
        return iter(self.items.values())

    def __len__(self) -> int:
        return len(self.manifest["items"])

    def __repr__(self) -> str:
        done = sum(r.get("status") == "done" for r in self.manifest["items"].values())
        return f"RunResults({str(self.directory)!r}, items={len(self)}, done={done})"


def open_path(path: Path) -> Any | None:
    """A run, an item or an observer folder at `path`; None when `path` is none of them."""
    if path.is_file() and path.name == MANIFEST:
        doc = read_json(path)
        return RunResults(path.parent, doc) if is_run_manifest(doc) else None
    if not path.is_dir():
        return None
    man = path / MANIFEST
    if man.is_file():
        doc = read_json(man)
        if is_run_manifest(doc):
            return RunResults(path, doc)
        return None  # a `save` manifest: the caller's job
    run_man = path.parent.parent / MANIFEST
    if path.parent.name == "items" and run_man.is_file():
        doc = read_json(run_man)
        if is_run_manifest(doc) and path.name in doc["items"]:
            return ItemResults(path, path.name, doc["items"][path.name])
    item_dir = path.parent
    item_man = item_dir.parent.parent / MANIFEST
    if item_dir.parent.name == "items" and item_man.is_file():
        doc = read_json(item_man)
        if is_run_manifest(doc) and item_dir.name in doc["items"]:
            return read_observer_folder(path)
    return None


def load_run(path: str | Path) -> Any:
    """Open what a run left at `path`.

    - an experiment run directory (the folder `attntrace run` prints) -> `RunResults`;
    - one item's directory (`<run>/items/<id>`) -> `ItemResults`;
    - one observer's folder in an item -> its results (`attntrace.runs.read_observer_folder`);
    - a folder saved by the `save` observer (or its `manifest.json`), or a tracer's output folder holding
      exactly one such folder -> `SavedRun`.
    """
    p = Path(path)
    opened = open_path(p)
    if opened is not None:
        return opened
    known = ("result.json", "stats.csv", "stats.parquet", "shapes.json", "heatmap.safetensors", "attnmaps.safetensors")
    if p.is_dir() and not (p / MANIFEST).is_file() and any((p / k).is_file() for k in known):
        return read_observer_folder(p)  # an observer folder outside a run (written by tracer.save)
    return load_saved_run(find_manifest(p))
