"""`run_experiment`: load the model, trace every prompt x seed item, write a resumable run directory.

Run directory layout (`runs/<name>/`):

- `manifest.json` — config, versions, seeds, timings, files and a status per item (`done`,
  `failed`, `interrupted`); written atomically (temp file + `os.replace`) after every item, so a
  crash or Ctrl-C leaves it consistent. Re-running skips `done` items; `force=True` redoes them.
- `items/<item-id>/image.png` — the generated image (pipelines); `items/<item-id>/<label>/...` —
  what each observer's `save()` wrote for that item (a fresh tracer per item, so results are per item).
  An observer whose `save()` writes nothing has its `result()` written by the runner instead
  (`result.json` + `result.safetensors`, see `attntrace.results`); one that recorded nothing is a warning.
- `warnings` in the manifest — rules that never fired, observers that recorded nothing; also printed.
- Observers that define `set_context(prompt=..., tokens=..., item=...)` receive the item's prompt and
  its tokens (as the pipeline's tokenizer splits it) before the item runs: per-word labels.
- Multi-process (`torchrun`/`accelerate launch`, env `RANK`/`WORLD_SIZE`): item *i* runs on rank
  *i % world*; each rank writes `manifest.rank<k>.json`; rank 0 merges them into `manifest.json`
  after a barrier (gloo on CPU, nccl on CUDA).

About 680 lines: planning, the manifest, distributed shards and the per-item loop all read and write
the one manifest format. Splitting it by concern (model loading, manifest I/O, the item loop) is the
next step once the concurrent experiment changes have landed (issue 13's closing note).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import (
    AttnTraceError,
    ConfigError,
    OutputWriteError,
    RunError,
    SelectionError,
    describe_failure,
    write_failure,
)
from ..core.messages import MANIFEST
from .checks import check_experiment
from .firing import FiringCounter, never_fired_warnings
from .spec import Experiment

__all__ = ["Item", "RunResult", "load_model", "plan_items", "run_experiment", "write_json_atomic"]

FORMAT = 1


@dataclass
class Item:
    """One unit of work: a prompt (or text), or an edit group of prompts, with a seed."""

    id: str
    index: int
    prompt: str
    seed: int | None
    negative_prompt: str | None = None
    #: An edit group's prompts, source first (one batch sharing start latents); None for one prompt.
    group: tuple[str, ...] | None = None


@dataclass
class RunResult:
    """What `run_experiment` did."""

    directory: Path
    manifest: dict[str, Any]
    ran: list[str]
    skipped: list[str]
    failed: list[str]
    warnings: list[str] = dataclasses.field(default_factory=list)


def plan_items(exp: Experiment) -> list[Item]:
    """Every item of the experiment in a fixed order: prompt-major, then seed (texts: one item each)."""
    if exp.is_text_model:
        return [Item(f"t{i:03d}", i, text, None) for i, text in enumerate(exp.inputs.texts)]
    items = []
    for p, (spec, group) in enumerate(zip(exp.inputs.prompt_specs(), exp.inputs.prompt_groups())):
        for seed in spec.seeds or [0]:
            items.append(Item(f"p{p:03d}-s{seed}", len(items), spec.prompt, seed, spec.negative_prompt, group))
    return items


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


def _save_manifest(path: Path, data: Any) -> None:
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
        raise ConfigError(
            f"the run directory {out} is not writable: {exc.strerror or exc}", field="output"
        ) from None


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


# -- distributed --------------------------------------------------------------------------------
@dataclass
class Dist:
    """Rank, world size and local rank from the launcher's environment (1 process: 0, 1, 0)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @classmethod
    def from_env(cls) -> Dist:
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise RunError("RANK/WORLD_SIZE/LOCAL_RANK must be integers") from None
        return cls(rank, max(world, 1), local)

    def init(self, use_cuda: bool) -> None:
        """Join the process group the launcher prepared (gloo on CPU, nccl on CUDA)."""
        if self.world <= 1:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if use_cuda and dist.is_nccl_available() else "gloo"
            dist.init_process_group(backend=backend, timeout=_dt.timedelta(hours=6))
            self.initialised_here = True

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()

    def close(self) -> None:
        if self.initialised_here:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


# -- model loading ------------------------------------------------------------------------------
def pick_device(spec: str, local_rank: int = 0) -> str:
    """Resolve `auto` to cuda (this process's local GPU under a launcher) or cpu."""
    import torch

    if spec == "auto":
        if torch.cuda.is_available():
            return f"cuda:{local_rank % torch.cuda.device_count()}"
        return "cpu"
    if spec == "cuda" and local_rank:
        return f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}"
    return spec


def pick_dtype(spec: str, device: str) -> Any:
    import torch

    if spec == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, spec)


def load_model(exp: Experiment, device: str | None = None) -> tuple[Any, Any]:
    """Load `(model_or_pipeline, tokenizer_or_None)` with the library's own `from_pretrained`."""
    from .checks import resolve_model_path

    name = exp.model.pipeline
    device = device or pick_device(exp.model.device)
    dtype = pick_dtype(exp.model.dtype, device)
    path = resolve_model_path(exp.model.path)
    kwargs: dict[str, Any] = {}
    if exp.model.subfolder:
        kwargs["subfolder"] = exp.model.subfolder
    if exp.is_text_model:
        try:
            import transformers
        except ImportError:
            raise RunError("transformers is not installed (model.pipeline is a transformers class)") from None
        cls = getattr(transformers, name, None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            raise ConfigError(f"transformers has no Auto class {name!r}", field="model.pipeline")
        try:
            model = cls.from_pretrained(path, dtype=dtype, **kwargs)
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as exc:
            raise RunError(f"cannot load {name} from {path}: {_first_line(exc)}") from None
        return model.to(device).eval(), tokenizer
    try:
        import diffusers
    except ImportError:
        raise RunError("model.pipeline names a diffusers pipeline but diffusers is not installed") from None
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ConfigError(f"diffusers has no pipeline class {name!r}", field="model.pipeline")
    try:
        with warnings.catch_warnings():  # diffusers 0.42 renamed torch_dtype; older releases need it
            warnings.simplefilter("ignore", FutureWarning)
            pipe = cls.from_pretrained(path, torch_dtype=dtype, **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        raise RunError(f"cannot load {name} from {path}: {_first_line(exc)}") from None
    return pipe.to(device), None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- progress -----------------------------------------------------------------------------------
class Progress:
    """Item and step progress: tqdm bars when installed and enabled, otherwise one line per item."""

    def __init__(self, total: int, enabled: bool = True, prefix: str = "") -> None:
        self.enabled = enabled
        self.prefix = prefix
        self.total = total
        self.done = 0
        self._bar: Any = None
        self._steps: Any = None
        self._tqdm: Any = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self._tqdm = tqdm
                self._bar = tqdm(total=total, desc=f"{prefix}items", unit="item", file=sys.stderr, position=0)
            except ImportError:
                self._tqdm = None

    def item_start(self, item: Item, steps: int | None) -> None:
        if not self.enabled:
            return
        if self._tqdm is not None and steps:
            self._steps = self._tqdm(
                total=steps,
                desc=f"{self.prefix}{item.id}",
                unit="step",
                leave=False,
                file=sys.stderr,
                position=1,
            )
        elif self._tqdm is None:
            print(f"{self.prefix}[{self.done + 1}/{self.total}] {item.id}: {item.prompt!r}", file=sys.stderr)

    def step(self) -> None:
        if self._steps is not None:
            self._steps.update(1)

    def item_end(self) -> None:
        self.done += 1
        if self._steps is not None:
            self._steps.close()
            self._steps = None
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._steps is not None:
            self._steps.close()
        if self._bar is not None:
            self._bar.close()


# -- the run ------------------------------------------------------------------------------------
def _new_manifest(exp: Experiment, items: list[Item], dist: Dist) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "name": exp.name,
        "config": exp.dump(),
        "versions": versions(),
        "created": _now(),
        "world_size": dist.world,
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


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _relative(files: list[Path], root: Path) -> list[str]:
    out = []
    for f in files:
        try:
            out.append(Path(f).resolve().relative_to(root.resolve()).as_posix())
        except ValueError:
            out.append(str(f))
    return sorted(set(out))


def run_experiment(
    exp: Experiment,
    *,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    model: tuple[Any, Any] | None = None,
) -> RunResult:
    """Run every item of `exp` not yet done in its run directory; return what ran.

    `model` may pass an already loaded `(pipeline_or_model, tokenizer)` (the demo does).
    Raises `KeyboardInterrupt` after writing the manifest when interrupted.
    """
    say = log or (lambda msg: print(msg, file=sys.stderr))
    check_experiment(exp)  # what the file alone tells (missing model folder, unreachable steps...): exit 2
    out = exp.output_dir
    dist = Dist.from_env()
    items = plan_items(exp)
    mine = [it for it in items if it.index % dist.world == dist.rank]
    main_path = out / MANIFEST
    shard_path = out / (f"manifest.rank{dist.rank}.json" if dist.world > 1 else MANIFEST)

    previous = read_manifest(main_path)
    if previous is not None and not force and previous.get("config") != exp.dump():
        raise RunError(
            f"{out} holds a run of a different experiment configuration; pass --force to redo it there, "
            f"or set another output"
        )
    manifest = _new_manifest(exp, items, dist)
    if previous is not None:
        manifest["created"] = previous.get("created", manifest["created"])
        for iid, rec in previous.get("items", {}).items():
            if iid in manifest["items"] and not force:
                manifest["items"][iid] = rec
    # A shard manifest of an interrupted multi-process run may know more than the merged one.
    if dist.world > 1 and not force:
        shard = read_manifest(shard_path)
        if shard is not None and shard.get("config") == exp.dump():
            for iid, rec in shard["items"].items():
                if iid in manifest["items"] and rec.get("status") == "done":
                    manifest["items"][iid] = rec

    def is_done(it: Item) -> bool:
        rec = manifest["items"][it.id]
        return rec.get("status") == "done" and all((out / f).exists() for f in rec.get("files", []))

    todo = [it for it in mine if force or not is_done(it)]
    skipped = [it.id for it in mine if it not in todo]
    ran: list[str] = []
    failed: list[str] = []
    check_writable(out)  # before the model loads: an unwritable output is a one-line error, at once
    for trash in (out / "items").glob(".discarded-*"):  # what a killed run had begun to delete
        shutil.rmtree(trash, ignore_errors=True)

    device = pick_device(exp.model.device, dist.local_rank)
    dist.init(device.startswith("cuda"))
    bar: Progress | None = None
    shown_notes: set[str] = set()
    try:
        prefix = f"[rank {dist.rank}] " if dist.world > 1 else ""
        if skipped:
            say(f"{prefix}skipping {len(skipped)} finished item(s) (use --force to redo them)")
        if todo:
            t0 = time.perf_counter()
            loaded = model if model is not None else load_model(exp, device)
            manifest.setdefault("timings", {})[f"load_rank{dist.rank}" if dist.world > 1 else "load"] = round(
                time.perf_counter() - t0, 3
            )
            _set_scheduler(exp, loaded[0])
            bar = Progress(len(todo), enabled=progress, prefix=prefix)
            for it in todo:
                rec = manifest["items"][it.id]
                item_dir = out / "items" / it.id
                if item_dir.exists():  # leftovers of an interrupted or forced item
                    _discard(item_dir)
                rec.update(status="running", started=_now(), files=[], error=None, rank=dist.rank)
                bar.item_start(it, None if exp.is_text_model else exp.inputs.steps)
                t1 = time.perf_counter()
                try:
                    files, extra = _run_item(exp, loaded, it, item_dir, bar)
                except KeyboardInterrupt:
                    rec.update(status="interrupted", finished=_now())
                    raise
                except Exception as exc:
                    broken = write_failure(exc)
                    if broken is not None:
                        # Disk full / file too large / read-only: every later item would fail the same way.
                        # Stop at the first failed write; finished items stay listed and intact.
                        rec.update(status="failed", error=f"write failed: {describe_failure(broken)}", finished=_now())
                        done = sum(r.get("status") == "done" for r in manifest["items"].values())
                        raise OutputWriteError(
                            f"item {it.id}: writing results failed: {describe_failure(broken)}; the run stopped "
                            f"({done} finished item(s) are kept in {shard_path}; free space and re-run to resume)",
                            path=getattr(broken, "path", None) or getattr(broken, "filename", None),
                        ) from None
                    if isinstance(exc, AttnTraceError) and not isinstance(exc, RunError):
                        # Bad configuration (e.g. a pattern matching no site) fails every item alike.
                        rec.update(status="failed", error=f"{type(exc).__name__}: {exc}", finished=_now())
                        raise
                    msg = f"{type(exc).__name__}: {_first_line(exc)}"
                    rec.update(status="failed", error=msg, finished=_now())
                    failed.append(it.id)
                    say(f"{prefix}item {it.id} failed: {type(exc).__name__}: {_first_line(exc)}")
                else:
                    for line in extra.get("warnings", []):
                        if line not in shown_notes:  # once per run, not once per item
                            shown_notes.add(line)
                            say(f"{prefix}warning: {line}")
                    rec.update(status="done", finished=_now(), files=_relative(files, out), **extra)
                    ran.append(it.id)
                finally:
                    rec["seconds"] = round(time.perf_counter() - t1, 3)
                    bar.item_end()
                    manifest["last_run"] = {"rank": dist.rank, "ran": ran, "skipped": skipped, "failed": failed}
                    _save_manifest(shard_path, manifest)
        else:
            manifest["last_run"] = {"rank": dist.rank, "ran": ran, "skipped": skipped, "failed": failed}
            _save_manifest(shard_path, manifest)
    except BaseException:
        with contextlib.suppress(Exception):
            write_json_atomic(shard_path, manifest)
        raise
    finally:
        if bar is not None:
            bar.close()

    if dist.world > 1:
        dist.barrier()  # every shard manifest is written before rank 0 merges
        if dist.rank == 0:
            manifest = merge_shards(out, exp, items, dist.world, previous)
            # rank 0 reports the whole run: every rank's items, not only its own
            everyone = manifest.get("last_run", {})
            ran = everyone.get("ran", ran)
            skipped = everyone.get("skipped", skipped)
            failed = everyone.get("failed", failed)
        dist.barrier()
        dist.close()
    warnings_ = _run_warnings(exp, manifest, ran)
    if warnings_ and dist.rank == 0:
        manifest["warnings"] = warnings_
        for line in warnings_:
            say(f"warning: {line}")
        _save_manifest(main_path, manifest)
    return RunResult(out, manifest, ran, skipped, failed, warnings_)


def _run_warnings(exp: Experiment, manifest: dict[str, Any], ran: list[str]) -> list[str]:
    """End-of-run warnings over the items run now: rules that never fired, observers that recorded nothing."""
    recs = [manifest["items"][i] for i in ran if i in manifest["items"]]
    fired: dict[str, int] = {}
    for rec in recs:
        for key, n in (rec.get("fired") or {}).items():
            fired[key] = fired.get(key, 0) + int(n)
    steps = max((int(rec.get("steps_seen") or 0) for rec in recs), default=0)
    out = never_fired_warnings(exp, fired, len(recs), steps or None)
    silent: dict[str, list[str]] = {}
    for iid in ran:
        for label in manifest["items"].get(iid, {}).get("empty", []):
            silent.setdefault(label, []).append(iid)
    for label, iids in silent.items():
        shown = ", ".join(iids[:3]) + (" ..." if len(iids) > 3 else "")
        out.append(
            f"observer {label!r} recorded nothing in {len(iids)} item(s) ({shown}): its sites gave it nothing it "
            "can use (e.g. `heatmap` needs cross or joint attention with an image grid)"
        )
    return out


def merge_shards(
    out: Path, exp: Experiment, items: list[Item], world: int, previous: dict[str, Any] | None
) -> dict[str, Any]:
    """Merge `manifest.rank<k>.json` files into `manifest.json` (rank 0, after the barrier)."""
    merged = _new_manifest(exp, items, Dist(0, world, 0))
    if previous is not None:
        merged["created"] = previous.get("created", merged["created"])
        for iid, rec in previous.get("items", {}).items():
            if iid in merged["items"]:
                merged["items"][iid] = rec
    timings: dict[str, Any] = {}
    last: dict[str, list[str]] = {"ran": [], "skipped": [], "failed": []}
    for k in range(world):
        shard = read_manifest(out / f"manifest.rank{k}.json")
        if shard is None:
            raise RunError(f"rank {k} wrote no shard manifest in {out}")
        timings.update(shard.get("timings", {}))
        for key in last:
            last[key] += list((shard.get("last_run") or {}).get(key, []))
        for it in items:
            if it.index % world == k:
                merged["items"][it.id] = shard["items"][it.id]
    merged["timings"] = timings
    merged["last_run"] = {"ranks": world, **last}
    write_json_atomic(out / MANIFEST, merged)
    return merged


@contextlib.contextmanager
def _maybe_no_grad() -> Iterator[None]:
    import torch

    with torch.inference_mode():
        yield


def _run_item(
    exp: Experiment, loaded: tuple[Any, Any], it: Item, item_dir: Path, bar: Progress
) -> tuple[list[Path], dict[str, Any]]:
    """Trace one item with a fresh tracer (so observer results are per item) and save everything."""

    from ..tracer import Tracer

    model, tokenizer = loaded
    item_dir.mkdir(parents=True, exist_ok=True)
    tracer = Tracer(exp.trace, output_dir=item_dir)
    firing = FiringCounter(tracer)
    files: list[Path] = []
    extra: dict[str, Any] = {}
    tokens = _tokens(model, tokenizer, it.prompt)
    if tokens is not None:
        extra["tokens"] = tokens
        if it.group is not None:  # each image of an edit group has its own prompt's words
            extra["prompt_tokens"] = [_tokens(model, tokenizer, p) for p in it.group]
    for obs in tracer.observers.values():
        # Observers that label their output by prompt words may accept the context; optional API.
        setter = getattr(obs, "set_context", None)
        if callable(setter):
            setter(prompt=it.prompt, tokens=tokens, item=it.id)
    try:
        notes: list[str] = []
        with _rules_named_in_trace(notes), tracer.attach(model) as attachment, _maybe_no_grad():
            if exp.is_text_model:
                enc = tokenizer(it.prompt, return_tensors="pt").to(next(model.parameters()).device)
                outputs = model(**enc)
                hidden = getattr(outputs, "last_hidden_state", None)
                if hidden is not None:
                    from safetensors.torch import save_file

                    path = item_dir / "last_hidden_state.safetensors"
                    with _writing(path):
                        save_file({"last_hidden_state": hidden.float().cpu().contiguous()}, str(path))
                    files.append(path)
            else:
                files += _run_pipeline(exp, model, it, item_dir, bar, tracer)
                _hand_image_to_observers(tracer, files)
            extra["steps_seen"] = attachment.step + 1
        extra["fired"] = dict(firing.counts)
        files += tracer.save(item_dir)  # a failed write names the observer (OutputWriteError)
        empty: list[str] = []
        lossy: list[str] = []
        for label, obs in tracer.observers.items():
            where = item_dir / label.replace("#", "_")
            if any(where in f.parents for f in files):
                continue  # the observer saved itself
            with _writing(where / "result.json"):  # otherwise the runner keeps its result()
                written, lost = _persist_result(label, obs, where)
            lossy += [f"{label}: {p}" for p in lost]
            files += written
            if not written:
                empty.append(label)
    finally:
        tracer.close()
    if empty:
        extra["empty"] = empty
    if lossy:
        notes.append(f"result values stored only as their repr (not JSON or tensors): {', '.join(lossy[:5])}")
    if notes:
        extra["warnings"] = notes
    return files, extra


def _persist_result(label: str, obs: Any, where: Path) -> tuple[list[Path], list[str]]:
    """Write `obs.result()` (JSON + safetensors) unless it is empty; returns (files, lossy value paths)."""
    from ..results import is_empty, write_result

    value = obs.result()
    if is_empty(value):
        return [], []
    cls = f"{type(obs).__module__}.{type(obs).__qualname__}"
    return write_result(value, where, label=label, observer_class=cls)


@contextlib.contextmanager
def _rules_named_in_trace(notes: list[str]) -> Iterator[None]:
    """Selection errors and warnings name their rule `rules.N...`; in an experiment file that field is
    `trace.rules.N...`. Warnings are collected into `notes` (printed once per run) instead of shown here."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            yield
    except SelectionError as exc:
        msg = str(exc)
        if msg.startswith("rules."):
            raise SelectionError("trace." + msg) from None
        raise
    for w in caught:
        text = str(w.message).removeprefix("attntrace: ")
        if issubclass(w.category, RuntimeWarning) and text.startswith("rules."):
            notes.append("trace." + text)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn a failed write of `path` into an `OutputWriteError` naming it (a partial file is removed)."""
    try:
        yield
    except Exception as exc:
        broken = write_failure(exc)
        if broken is None:
            raise
        with contextlib.suppress(OSError):
            path.unlink()
        raise OutputWriteError(f"cannot write {path}: {describe_failure(broken)}", path=str(path)) from exc


def _discard(item_dir: Path) -> None:
    """Delete an unfinished item's folder: renamed away first (atomic), so that a kill during the deletion
    never leaves a half-deleted folder, whose own manifests would list files that are gone."""
    trash = item_dir.with_name(f".discarded-{item_dir.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(item_dir, trash)
    shutil.rmtree(trash)


def _hand_image_to_observers(tracer: Any, files: list[Path]) -> None:
    """Observers drawing on the generated image (heat maps) get it before they save."""
    pngs = [f for f in files if f.suffix == ".png"]
    setters = [s for s in (getattr(o, "set_image", None) for o in tracer.observers.values()) if callable(s)]
    if not pngs or not setters:
        return
    from PIL import Image

    with Image.open(pngs[0]) as img:
        rgb = img.convert("RGB")
    for setter in setters:
        setter(rgb)


def _tokens(model: Any, tokenizer: Any, prompt: str) -> list[str] | None:
    """The prompt's tokens as the text encoder sees them (for per-word heat maps)."""
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        return None
    try:
        ids = tok(prompt)["input_ids"]
        return [str(t) for t in tok.convert_ids_to_tokens(ids)]
    except Exception:  # a tokenizer we do not understand: the run goes on without tokens
        return None


def _set_scheduler(exp: Experiment, pipe: Any) -> None:
    """Swap in `inputs.scheduler`, built from the pipeline's own scheduler config (a no-op when unset)."""
    name = exp.inputs.scheduler
    if not name or exp.is_text_model:
        return
    import diffusers

    cls = getattr(diffusers, name)
    current = getattr(pipe, "scheduler", None)
    if current is None:
        raise ConfigError(f"{type(pipe).__name__} has no scheduler to replace", field="inputs.scheduler")
    if type(current) is not cls:
        pipe.scheduler = cls.from_config(current.config)


def _run_pipeline(
    exp: Experiment, pipe: Any, it: Item, item_dir: Path, bar: Progress, tracer: Any = None
) -> list[Path]:
    import inspect

    import torch

    inp = exp.inputs
    device = getattr(pipe, "device", torch.device("cpu"))
    gen_device = "cpu" if inp.generator_device == "cpu" or str(device) in ("cpu", "mps") else device
    kwargs: dict[str, Any] = {
        **inp.pipeline_kwargs,
        "prompt": list(it.group) if it.group is not None else it.prompt,
        "num_inference_steps": inp.steps,
        "guidance_scale": inp.guidance_scale,
        "generator": torch.Generator(gen_device).manual_seed(int(it.seed or 0)),
    }
    if it.negative_prompt is not None:
        # diffusers wants a list of negatives for a list of prompts (an edit group)
        kwargs["negative_prompt"] = it.negative_prompt if it.group is None else [it.negative_prompt] * len(it.group)
    if inp.height:
        kwargs["height"] = inp.height
    if inp.width:
        kwargs["width"] = inp.width
    params = inspect.signature(pipe.__call__).parameters
    if "callback_on_step_end" in params:

        def on_step_end(pipeline: Any, i: int, t: Any, cb_kwargs: dict[str, Any]) -> dict[str, Any]:
            bar.step()
            return {}

        kwargs["callback_on_step_end"] = on_step_end
    # Our own bar shows the steps; the pipeline's own bar setting is restored afterwards, so that a
    # pipeline passed in (the demo, notebooks) keeps showing diffusers' progress bar later.
    saved_bar = dict(getattr(pipe, "_progress_bar_config", None) or {})
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    group = tracer.edit_group() if (it.group is not None and tracer is not None) else contextlib.nullcontext()
    try:
        with group:  # an edit group: one batch from the source's start latents, source first
            result = pipe(**kwargs)
    finally:
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(**saved_bar)
    images = getattr(result, "images", None)
    if images is None and isinstance(result, tuple):
        images = result[0]
    files = []
    for n, img in enumerate(images or []):
        if hasattr(img, "save"):
            path = item_dir / ("image.png" if n == 0 else f"image_{n}.png")
            with _writing(path):
                img.save(path)
            files.append(path)
    return files
