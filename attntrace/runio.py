"""Reading runs written by the `save` observer (`attntrace.load_run(path)` -> `SavedRun`), lazily and without pickle.

```python
run = attntrace.load_run("runs/exp1/save")
run.sites, run.steps
probs = run.get("up_blocks.1.attentions.0.transformer_blocks.0.attn2", step=3, tensor="probs")
```
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .core.errors import RunError
from .core.messages import MANIFEST

__all__ = ["RunEntry", "SavedRun", "find_manifest", "load_saved_run"]

_FIELDS = ("site", "step", "index", "tensor", "shape", "dtype", "file", "key")


@dataclass(frozen=True)
class RunEntry:
    """One saved tensor: where it came from and where it lies."""

    site: str
    step: int
    timestep: float | None
    index: int
    kind: str | None
    tensor: str
    shape: tuple[int, ...]
    dtype: str
    file: str
    key: str


class SavedRun:
    """A saved run directory. Tensors are read on demand from their safetensors files."""

    def __init__(self, directory: Path, entries: list[RunEntry], meta: dict[str, Any]) -> None:
        self.directory = directory
        self.entries = entries
        self.meta = meta
        self._by_key = {(e.site, e.step, e.tensor, e.index): e for e in entries}

    @property
    def sites(self) -> list[str]:
        """Site names, in the order they were first saved."""
        return list(dict.fromkeys(e.site for e in self.entries))

    @property
    def steps(self) -> list[int]:
        """Saved steps, ascending."""
        return sorted({e.step for e in self.entries})

    @property
    def tensors(self) -> list[str]:
        """Saved tensor names (query, key, value, probs, output)."""
        return list(dict.fromkeys(e.tensor for e in self.entries))

    def entry(self, site: str, step: int, tensor: str = "probs", index: int = 0) -> RunEntry:
        """The manifest entry of one saved tensor; `RunError` if it was not saved."""
        found = self._by_key.get((site, step, tensor, index))
        if found is None:
            raise RunError(
                f"{self.directory}: no {tensor!r} saved for site {site!r}, step {step}, index {index} "
                f"(saved sites: {len(self.sites)}, steps: {self.steps}, tensors: {self.tensors})"
            )
        return found

    def get(self, site: str, step: int, tensor: str = "probs", index: int = 0) -> torch.Tensor:
        """Load one tensor (CPU) through `safetensors.safe_open`."""
        from safetensors import safe_open

        e = self.entry(site, step, tensor, index)
        path = self.directory / e.file
        try:
            with safe_open(str(path), framework="pt") as fh:
                t = fh.get_tensor(e.key)
        except Exception as exc:  # missing, truncated or corrupt file: name it, others stay readable
            raise RunError(
                f"cannot read saved tensor {e.key!r} from {path}: {type(exc).__name__}: {exc}"
            ) from None
        if tuple(t.shape) != e.shape:
            raise RunError(
                f"{path}: tensor {e.key!r} has shape {tuple(t.shape)}, the manifest says {e.shape}"
            )
        return t

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        where = str(self.directory)
        return f"SavedRun({where!r}, sites={len(self.sites)}, steps={self.steps}, tensors={self.tensors})"


def find_manifest(path: Path) -> Path:
    if path.is_file():
        return path
    if (path / MANIFEST).is_file():
        return path / MANIFEST
    if path.is_dir():
        # A tracer's output_dir holds one folder per rule label: accept it when one of them is a saved run.
        found = sorted(p for p in path.glob(f"*/{MANIFEST}") if p.is_file())
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            choices = ", ".join(str(p.parent) for p in found)
            raise RunError(f"{path} holds several saved runs; pass one of: {choices}")
        raise RunError(
            f"{path / MANIFEST} not found: {path} is not a run directory, an item or observer folder of a run, "
            "or a run saved by the 'save' observer"
        )
    raise RunError(f"{path} does not exist")


def load_saved_run(manifest: Path) -> SavedRun:
    """Open the `save` observer's manifest (its `manifest.json`) as a `SavedRun`."""
    directory = manifest.parent
    try:
        doc = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"cannot read the run manifest {manifest}: {exc}") from None
    raw = doc.get("entries") if isinstance(doc, dict) else doc
    if not isinstance(raw, list):
        raise RunError(f"the run manifest {manifest} has no 'entries' list")
    entries: list[RunEntry] = []
    root = directory.resolve()
    for i, e in enumerate(raw):
        if not isinstance(e, dict) or any(f not in e for f in _FIELDS):
            missing = [f for f in _FIELDS if not isinstance(e, dict) or f not in e]
            raise RunError(f"the run manifest {manifest}: entry {i} lacks {missing}")
        file = str(e["file"])
        if not (root / file).resolve().is_relative_to(root):
            raise RunError(
                f"the run manifest {manifest}: entry {i} points outside the run directory ({file!r})"
            )
        try:
            entries.append(
                RunEntry(
                    site=str(e["site"]),
                    step=int(e["step"]),
                    timestep=None if e.get("timestep") is None else float(e["timestep"]),
                    index=int(e["index"]),
                    kind=e.get("kind"),
                    tensor=str(e["tensor"]),
                    shape=tuple(int(x) for x in e["shape"]),
                    dtype=str(e["dtype"]),
                    file=file,
                    key=str(e["key"]),
                )
            )
        except (TypeError, ValueError) as exc:
            raise RunError(f"the run manifest {manifest}: entry {i} is malformed: {exc}") from None
    meta = {k: v for k, v in doc.items() if k != "entries"} if isinstance(doc, dict) else {}
    return SavedRun(directory, entries, meta)
