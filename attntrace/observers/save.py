"""`save`: writes query/key/value/probs/output of selected sites and steps to safetensors files.

Each (site, step, call index) becomes one safetensors file holding the chosen tensors, written by a
background thread under a temporary name and renamed. The JSON manifest `manifest.json` is committed
in batches: the files written since the last commit are fsynced, then the manifest is rewritten
atomically (temporary file, fsync, rename). A commit happens when the writer has been idle, at most
every `COMMIT_EVERY_S` seconds while it is busy, and on flush/close. A run killed at any moment
leaves a manifest that lists only complete, durable files (the files of the last fraction of a
second may exist unlisted). Read a run back with `attntrace.load_run(path)`.

Why batches: rewriting the manifest after every file costs time that grows with the run (the
manifest holds every entry) and, on a small CPU, steals cycles from the forward it runs beside.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..core.call import AttentionCall
from ..core.errors import ConfigError, OutputWriteError
from ..core.messages import MANIFEST
from ..core.observer import Observer, batch_rows

__all__ = ["MANIFEST", "Save", "SaveParams"]

TENSORS = ("query", "key", "value", "probs", "output")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_STOP = object()
_COMMIT = object()
#: While files keep arriving, the manifest is committed at most this often (seconds).
COMMIT_EVERY_S = 0.5


def _banded(layout: Any) -> dict[str, Any]:
    """Manifest fields of a probability map laid out otherwise than `dense` (see `Layout.probs`)."""
    windowed = layout.probs in ("banded", "block_local")
    band = {"window": layout.window, "global_keys": layout.global_keys} if windowed else {}
    band |= {"levels": layout.levels, "points": list(layout.points)} if layout.points else {}
    return {} if layout.probs == "dense" else {"probs_layout": layout.probs, **band}


class SaveParams(BaseModel):
    """Parameters of `save`."""

    model_config = ConfigDict(extra="forbid")

    tensors: list[Literal["query", "key", "value", "probs", "output"]] = Field(
        default_factory=lambda: ["probs"], description="which tensors to save"
    )
    dtype: Literal["float16", "bfloat16", "float32"] = Field(default="float16", description="stored dtype")
    head_mean: bool = Field(default=False, description="store the mean over heads (head axis kept, size 1)")
    cond_half: bool = Field(
        default=False, description="store only the conditional (second) half of the batch"
    )
    max_resolution: int | None = Field(
        default=None, ge=1, description="skip sites whose image token grid is larger than this per side"
    )
    queue_size: int = Field(default=64, ge=1, description="files waiting to be written before forward blocks")
    max_pending_mib: float = Field(
        default=256.0, gt=0, description="bytes waiting to be written before forward blocks (one file always fits)"
    )
    max_chunk_mib: float = Field(default=256.0, gt=0, description="chunk budget when computing probs")
    dir: str | None = Field(
        default=None, description="where to write (default: the tracer's output_dir/<label>)"
    )

    @field_validator("tensors")
    @classmethod
    def _tensors(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("choose at least one of query, key, value, probs, output")
        return list(dict.fromkeys(v))


class Save(Observer):
    """Saves tensors of each matched call to disk in a background thread.

    Memory: the pending files (the chosen tensors of a call, in the stored dtype): at most
    `queue_size` files and `max_pending_mib` MiB (or one file, if a single file is larger), plus the
    manifest entries (a few hundred bytes per tensor saved), which grow with steps x sites x tensors.
    The forward blocks only when one of those two bounds is reached. Probabilities
    are built chunk by chunk straight into the stored dtype (and head mean), so a site's full float32
    map is not materialised unless another observer already did.

    The manifest is committed in batches (see the module docstring); its size grows with the entries
    (about 300 bytes per saved tensor). A fresh observer starts a fresh manifest in its directory.
    """

    name = "save"
    Params = SaveParams
    # Saved as the call gives them; a banded, block-sparse or block-local map's manifest entry records its layout.
    probs_layouts = frozenset({"dense", "banded", "block_sparse", "block_local", "sampling_point", "additive"})

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        # Instance-level needs: only what is saved is computed.
        self.needs = frozenset(self.params.tensors)  # type: ignore[misc]
        self.entries: list[dict[str, Any]] = []
        self.files: list[Path] = []
        self._queue: queue.Queue[Any] | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._error_file: Path | None = None  # the file whose write failed
        self._current: Path | None = None  # the file being written (names a failure)
        self._reported = False
        self._lock = threading.Lock()
        self._pending = threading.Condition()
        self._pending_bytes = 0
        self._unsynced: list[Path] = []
        self._staged: list[tuple[str, Path, list[dict[str, Any]]]] = []
        self._dir: Path | None = None
        self._atexit_registered = False

    # -- where -----------------------------------------------------------------------------------
    @property
    def directory(self) -> Path | None:
        """The run directory this observer writes to (None until known)."""
        if self.params.dir is not None:
            return Path(self.params.dir)
        return self.output_dir

    def on_attach(self, attachment: Any) -> None:
        if self.directory is None:
            raise ConfigError(
                "the save observer needs a directory: use Tracer(output_dir=...) or set with: {dir: PATH}",
                field="dir",
            )

    # -- per call --------------------------------------------------------------------------------
    def on_call(self, call: AttentionCall) -> None:
        self._raise_writer_error(again=True)
        p = self.params
        if p.max_resolution is not None and self._side(call) > p.max_resolution:
            return
        keep = batch_rows(call, p.cond_half)
        dtype = _DTYPES[p.dtype]
        tensors: dict[str, torch.Tensor] = {}
        for name in p.tensors:
            if name == "probs":
                t = self._probs(call, keep, dtype)
            else:
                src = getattr(call, name)
                t = src[keep].detach()
                if p.head_mean:
                    t = t.float().mean(dim=1, keepdim=True)
                t = t.to(device="cpu", dtype=dtype).contiguous()
                if t.untyped_storage().data_ptr() == src.untyped_storage().data_ptr():
                    t = t.clone()  # never queue a view of a tensor the model may still change
            tensors[name] = t
        item = {
            "site": call.site,
            "step": call.step,
            "timestep": call.timestep,
            "index": call.index,
            "kind": call.kind,
            "tensors": tensors,
            "layout": call.layout,
        }
        self._ensure_writer()
        assert self._queue is not None
        nbytes = sum(t.nbytes for t in tensors.values())
        budget = int(p.max_pending_mib * 2**20)
        with self._pending:
            while self._pending_bytes and self._pending_bytes + nbytes > budget and self._error is None:
                self._pending.wait(0.1)
            self._pending_bytes += nbytes
        item["nbytes"] = nbytes
        self._queue.put(item)  # blocks while `queue_size` files are pending

    def _side(self, call: AttentionCall) -> float:
        if call.image_hw is not None:
            return max(call.image_hw)
        n = call.image_tokens.stop - call.image_tokens.start if call.image_tokens else call.shape[2]
        return math.sqrt(n)

    def _probs(self, call: AttentionCall, keep: slice, dtype: torch.dtype) -> torch.Tensor:
        _, h, lq, lk = call.shape
        out = torch.empty((keep.stop - keep.start, 1 if self.params.head_mean else h, lq, lk), dtype=dtype)
        for rows, chunk in call.iter_probs(int(self.params.max_chunk_mib * 2**20), batch=keep):
            c = chunk
            if self.params.head_mean:
                c = c.mean(dim=1, keepdim=True)
            out[:, :, rows] = c.to(device="cpu", dtype=dtype)
            del chunk, c  # free before the next chunk is computed
        return out

    def on_step_end(self, step: int) -> None:
        # Never blocks: the writer catches up in the background.
        self._raise_writer_error()

    # -- writer thread ---------------------------------------------------------------------------
    def _ensure_writer(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        directory = self.directory
        if directory is None:
            raise ConfigError(
                "the save observer has no directory (set Tracer(output_dir=...) or dir)", field="dir"
            )
        directory.mkdir(parents=True, exist_ok=True)
        self._dir = directory
        self._queue = queue.Queue(maxsize=self.params.queue_size)
        self._thread = threading.Thread(target=self._writer, name="attntrace-save", daemon=True)
        self._thread.start()
        if not self._atexit_registered:
            atexit.register(self.close)
            self._atexit_registered = True

    def _writer(self) -> None:
        assert self._queue is not None
        _lower_thread_priority()
        dirty = False
        last_commit = time.monotonic()
        while True:
            wait = None if not dirty else max(0.0, last_commit + COMMIT_EVERY_S - time.monotonic())
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:  # uncommitted files and nothing new for a while: commit them now
                try:
                    if self._error is None:
                        self._commit()
                except BaseException as exc:
                    self._error_file = self._current
                    self._error = exc
                dirty, last_commit = False, time.monotonic()
                continue
            try:
                if item is _STOP or item is _COMMIT:
                    if dirty and self._error is None:
                        self._commit()
                    dirty, last_commit = False, time.monotonic()
                    if item is _STOP:
                        return
                elif self._error is None:  # after a failure keep draining so the forward never deadlocks
                    self._write(item)
                    dirty = True
                    if time.monotonic() - last_commit >= COMMIT_EVERY_S:
                        self._commit()
                        dirty, last_commit = False, time.monotonic()
            except BaseException as exc:
                self._error_file = self._current
                self._error = exc
                if dirty:  # what was fully written before the failure stays listed and readable
                    with contextlib.suppress(BaseException):
                        self._commit()
                    dirty = False
            finally:
                if isinstance(item, dict):
                    with self._pending:
                        self._pending_bytes -= item.get("nbytes", 0)
                        self._pending.notify_all()
                self._queue.task_done()

    def _write(self, item: dict[str, Any]) -> None:
        """Write one file (temporary name, then rename) and stage its manifest entries."""
        from safetensors.torch import save_file

        assert self._dir is not None
        site = re.sub(r"[^A-Za-z0-9_.-]", "_", item["site"])
        fname = f"step{item['step']:05d}__{site}__{item['index']}.safetensors"
        final = self._dir / fname
        tmp = self._dir / f".{fname}.tmp{os.getpid()}"
        meta = {"site": item["site"], "step": str(item["step"]), "index": str(item["index"])}
        self._current = final
        try:
            save_file(item["tensors"], str(tmp), metadata=meta)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):  # never leave a half-written temporary behind
                tmp.unlink()
            raise
        new = [
            {
                "site": item["site"],
                "step": item["step"],
                "timestep": item["timestep"],
                "index": item["index"],
                "kind": item["kind"],
                "tensor": name,
                "shape": list(t.shape),
                "dtype": self.params.dtype,
                "file": fname,
                "key": name,
                **(_banded(item["layout"]) if name == "probs" else {}),
            }
            for name, t in item["tensors"].items()
        ]
        self._unsynced.append(final)
        self._staged.append((fname, final, new))

    def _commit(self) -> None:
        """Make the staged files durable, then list them in the manifest."""
        for path in dict.fromkeys(self._unsynced):
            self._current = path
            _fsync_file(path)
        self._unsynced.clear()
        staged, self._staged = self._staged, []
        with self._lock:
            for fname, final, new in staged:
                # a rewritten (site, step, index) replaces its old entries
                self.entries = [e for e in self.entries if e["file"] != fname] + new
                if final not in self.files:
                    self.files.append(final)
            self._write_manifest()

    def _write_manifest(self) -> None:
        assert self._dir is not None
        doc = {
            "format": "attntrace-run",
            "version": 1,
            "params": self.params.model_dump(),
            "entries": self.entries,
        }
        path = self._dir / MANIFEST
        tmp = self._dir / f".{MANIFEST}.tmp{os.getpid()}"
        self._current = path
        text = json.dumps(doc)  # one shot: the C encoder (json.dump streams through the pure-Python one)
        try:
            with tmp.open("w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):  # the previous manifest stays as it was
                tmp.unlink()
            raise
        _fsync_dir(self._dir)

    def _raise_writer_error(self, again: bool = False) -> None:
        # A write failure is permanent for this observer (the writer only drains after it): it is
        # raised once from flush/close/step end, and from every later on_call (nothing more is queued).
        exc = self._error
        if exc is None or (self._reported and not again):
            return
        self._reported = True
        where = self._error_file or self._dir
        detail = " ".join(str(exc).split())  # one line, whatever the library said
        raise OutputWriteError(
            f"the save observer failed writing {where}: {type(exc).__name__}: {detail}", path=str(where)
        ) from exc

    def flush(self) -> None:
        """Wait until every queued file is written and listed in the manifest."""
        if self._queue is not None and self._thread is not None and self._thread.is_alive():
            self._queue.put(_COMMIT)
            self._queue.join()
        self._raise_writer_error()

    # -- results ---------------------------------------------------------------------------------
    def result(self) -> list[dict[str, Any]]:
        """The manifest entries written so far (one per saved tensor)."""
        with self._lock:
            return list(self.entries)

    def save(self, directory: Path) -> list[Path]:
        """Flush and join the writer; return the manifest and data files (already under `directory`)."""
        self._stop()
        if self._dir is None:
            return []
        return [self._dir / MANIFEST, *self.files]

    def _stop(self) -> None:
        thread, q = self._thread, self._queue
        if thread is not None and q is not None and thread.is_alive():
            q.put(_STOP)
            thread.join()
        self._thread = None
        self._raise_writer_error()

    def close(self) -> None:
        """Flush pending files and stop the writer thread."""
        try:
            self._stop()
        finally:
            if self._atexit_registered:
                atexit.unregister(self.close)
                self._atexit_registered = False


def _lower_thread_priority() -> None:
    # The writer should yield the CPU to the forward's compute threads (on Linux a thread has its own
    # nice value); raising one's own nice value needs no privilege. Elsewhere this is a no-op.
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Makes the rename durable; not possible on every platform (Windows), where it is skipped.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
