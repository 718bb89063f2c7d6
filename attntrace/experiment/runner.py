"""`run_experiment`: trace every prompt x seed item of an experiment into a resumable run directory.

Re-running skips `done` items (`force=True` redoes them); each item is written by `item.run_item` with a
fresh tracer, and the manifest (`rundir`) is saved after every item. Multi-process runs share the
items by rank (`distributed`). The pieces: `plan` (items), `loading` (model), `progress`, `item`
(one item's run and files), `rundir` (manifest and folders), `distributed` (ranks and shards).
At the end, rules that never fired and observers that recorded nothing are the manifest's `warnings`
(also printed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import AttnTraceError, OutputWriteError, RunError, describe_failure, write_failure
from ..core.messages import MANIFEST
from .checks import check_experiment
from .distributed import Dist, merge_shards
from .firing import never_fired_warnings
from .item import run_item
from .loading import first_line, load_model, pick_device, set_scheduler
from .plan import Item, plan_items
from .progress import Progress
from .rundir import (
    check_writable,
    discard_item_dir,
    new_manifest,
    now,
    read_manifest,
    relative_files,
    save_manifest,
    write_json_atomic,
)
from .spec import Experiment

__all__ = ["Item", "RunResult", "load_model", "plan_items", "read_manifest", "run_experiment", "write_json_atomic"]


@dataclass
class RunResult:
    """What `run_experiment` did."""

    directory: Path
    manifest: dict[str, Any]
    ran: list[str]
    skipped: list[str]
    failed: list[str]
    warnings: list[str] = dataclasses.field(default_factory=list)


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
    manifest = new_manifest(exp, items, dist.world)
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
            set_scheduler(exp, loaded[0])
            bar = Progress(len(todo), enabled=progress, prefix=prefix)
            for it in todo:
                rec = manifest["items"][it.id]
                item_dir = out / "items" / it.id
                if item_dir.exists():  # leftovers of an interrupted or forced item
                    discard_item_dir(item_dir)
                rec.update(status="running", started=now(), files=[], error=None, rank=dist.rank)
                bar.item_start(it, None if exp.is_text_model else exp.inputs.steps)
                t1 = time.perf_counter()
                try:
                    files, extra = run_item(exp, loaded, it, item_dir, bar)
                except KeyboardInterrupt:
                    rec.update(status="interrupted", finished=now())
                    raise
                except Exception as exc:
                    broken = write_failure(exc)
                    if broken is not None:
                        # Disk full / file too large / read-only: every later item would fail the same way.
                        # Stop at the first failed write; finished items stay listed and intact.
                        rec.update(status="failed", error=f"write failed: {describe_failure(broken)}", finished=now())
                        done = sum(r.get("status") == "done" for r in manifest["items"].values())
                        raise OutputWriteError(
                            f"item {it.id}: writing results failed: {describe_failure(broken)}; the run stopped "
                            f"({done} finished item(s) are kept in {shard_path}; free space and re-run to resume)",
                            path=getattr(broken, "path", None) or getattr(broken, "filename", None),
                        ) from None
                    if isinstance(exc, AttnTraceError) and not isinstance(exc, RunError):
                        # Bad configuration (e.g. a pattern matching no site) fails every item alike.
                        rec.update(status="failed", error=f"{type(exc).__name__}: {exc}", finished=now())
                        raise
                    msg = f"{type(exc).__name__}: {first_line(exc)}"
                    rec.update(status="failed", error=msg, finished=now())
                    failed.append(it.id)
                    say(f"{prefix}item {it.id} failed: {type(exc).__name__}: {first_line(exc)}")
                else:
                    for line in extra.get("warnings", []):
                        if line not in shown_notes:  # once per run, not once per item
                            shown_notes.add(line)
                            say(f"{prefix}warning: {line}")
                    rec.update(status="done", finished=now(), files=relative_files(files, out), **extra)
                    ran.append(it.id)
                finally:
                    rec["seconds"] = round(time.perf_counter() - t1, 3)
                    bar.item_end()
                    manifest["last_run"] = {"rank": dist.rank, "ran": ran, "skipped": skipped, "failed": failed}
                    save_manifest(shard_path, manifest)
        else:
            manifest["last_run"] = {"rank": dist.rank, "ran": ran, "skipped": skipped, "failed": failed}
            save_manifest(shard_path, manifest)
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
        save_manifest(main_path, manifest)
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
