"""The run directory: the manifest (written atomically), its item records, the write probe and the
discarding of unfinished item folders.

`manifest.json` holds the config, versions, seeds, timings, files and a status per item (`done`,
`failed`, `interrupted`); it is written with a temp file and `os.replace` after every item, so a crash
or Ctrl-C leaves it consistent.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError, OutputWriteError, RunError
from .plan import Item
from .spec import Experiment

__all__ = [
    "FORMAT",
    "check_writable",
    "discard_item_dir",
    "new_manifest",
    "now",
    "read_manifest",
    "relative_files",
    "save_manifest",
    "versions",
    "write_json_atomic",
]


FORMAT = 1


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file in the same folder, fsync, then `os.replace` (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=False, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_manifest(path: Path, data: Any) -> None:
    """`write_json_atomic` whose failure (disk full...) is an `OutputWriteError` naming the manifest."""
    try:
        write_json_atomic(path, data)
    except OSError as exc:
        raise OutputWriteError(
            f"cannot write the run manifest {path}: {exc.strerror or exc} (the previous manifest is unchanged)",
            path=str(path),
        ) from None


def check_writable(out: Path) -> None:
    """Create the run directory and write, fsync and delete a probe file in it; `ConfigError` if not possible.

    Run before the model is loaded so that an unwritable output costs seconds, not an item's work.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".attntrace-probe-", dir=out)
        try:
            os.write(fd, b"attntrace write probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"the run directory {out} is not writable: {exc.strerror or exc}", field="output") from None


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest at `path`, or None if absent; a corrupt one is a `RunError`."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("items"), dict):
        raise RunError(f"{path} is not an attntrace manifest (no 'items')")
    return data


def versions() -> dict[str, str | None]:
    """Versions of the libraries that shape a run's numbers."""
    from .. import __version__

    out: dict[str, str | None] = {"attntrace": __version__, "python": platform.python_version()}
    for mod in ("torch", "diffusers", "transformers", "accelerate"):
        m = sys.modules.get(mod)
        if m is None:
            try:
                m = __import__(mod)
            except ImportError:
                out[mod] = None
                continue
        out[mod] = getattr(m, "__version__", None)
    return out


def new_manifest(exp: Experiment, items: list[Item], world: int) -> dict[str, Any]:
    """A manifest listing every item as pending (run by `world` processes)."""
    return {
        "format": FORMAT,
        "name": exp.name,
        "config": exp.dump(),
        "versions": versions(),
        "created": now(),
        "world_size": world,
        "seeds": list(exp.inputs.seeds),
        "items": {
            it.id: {
                "index": it.index,
                "prompt": it.prompt,
                **({"negative_prompt": it.negative_prompt} if it.negative_prompt is not None else {}),
                **({"prompts": list(it.group)} if it.group is not None else {}),  # an edit group, source first
                "seed": it.seed,
                "status": "pending",
                "files": [],
            }
            for it in items
        },
    }


def now() -> str:
    """The time now, UTC, to the second (ISO 8601)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def relative_files(files: list[Path], root: Path) -> list[str]:
    """`files` as sorted POSIX paths relative to `root` (absolute where outside it)."""
    out = []
    for f in files:
        try:
            out.append(Path(f).resolve().relative_to(root.resolve()).as_posix())
        except ValueError:
            out.append(str(f))
    return sorted(set(out))


def discard_item_dir(item_dir: Path) -> None:
    """Delete an unfinished item's folder: renamed away first (atomic), so that a kill during the deletion
    never leaves a half-deleted folder, whose own manifests would list files that are gone."""
    trash = item_dir.with_name(f".discarded-{item_dir.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(item_dir, trash)
    shutil.rmtree(trash)
