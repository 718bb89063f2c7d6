"""Crash safety of `attntrace run`, for real: SIGKILL a running `python -m attntrace run` at seeded random
points, check what is on disk after each kill, then resume and compare with an uninterrupted run.

After every kill: the run manifest is valid JSON (or absent, if no item had finished); every file it
lists for a finished item exists and loads (safetensors, JSON, CSV, PNG, the `save` observer's run via
`load_run`); no temporary file is listed; and the `save` observer's own manifest of an unfinished item
also lists only complete files. After resuming: images, saved tensors (`torch.equal`) and stats tables
equal those of an uninterrupted run in another directory.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from attntrace import load_run

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
KILLS = 5
SEED = 20261124


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # fmt: skip


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory, demo_pipeline_dir: Path) -> Path:
    tmp = tmp_path_factory.mktemp("crash")
    pipe = demo_pipeline_dir
    path = tmp / "exp.yaml"
    path.write_text(
        "name: crash\n"
        f"model: {{pipeline: StableDiffusionPipeline, path: '{pipe}', dtype: float32, device: cpu}}\n"
        "inputs: {prompts: ['a cat on a mat', 'a red house', 'a blue boat'], seeds: [0, 1], steps: 2,"
        " guidance_scale: 5.0, height: 64, width: 64}\n"
        "trace:\n  rules:\n"
        "    - {use: save, match: ['down_blocks.*attn2', 'mid_block.*'], with: {tensors: [probs, output],"
        " dtype: float32, queue_size: 2}}\n"
        "    - {use: stats, match: 'up_blocks.*', kind: self, with: {metrics: [entropy], reduce_heads: true}}\n"
        "output: runs/{name}\n"
    )
    return path


def _run(exp: Path, out: Path, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "attntrace", "run", str(exp), "--no-progress", "--output",
                             str(out)], env=_env(), cwd=exp.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)  # type: ignore[call-overload]  # fmt: skip


def _manifest(out: Path) -> dict | None:
    path = out / "manifest.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())  # never half-written: a JSONDecodeError fails the test


def _load_any(path: Path) -> None:
    """Load a result file completely by its type."""
    if path.suffix == ".safetensors":
        load_file(str(path))
    elif path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".png":
        with Image.open(path) as img:
            img.load()
    elif path.suffix == ".csv":
        lines = path.read_text().splitlines()
        assert lines and all(ln.count(",") == lines[0].count(",") for ln in lines), path
    else:
        path.read_bytes()


def _check_saved_run(directory: Path) -> int:
    saved = load_run(directory)
    for e in saved.entries:
        assert not e.file.startswith("."), e.file
        assert tuple(saved.get(e.site, e.step, e.tensor, e.index).shape) == e.shape
    return len(saved.entries)


def check_consistent(out: Path) -> dict[str, int]:
    """What a kill may leave: only complete, loadable files listed, anywhere."""
    man = _manifest(out)
    counts = {"done": 0, "files": 0, "partial_saves": 0}
    if man is not None:
        for iid, rec in man["items"].items():
            if rec["status"] != "done":
                continue
            counts["done"] += 1
            assert rec["files"], iid
            for f in rec["files"]:
                assert not Path(f).name.startswith(".") and ".tmp" not in f, f
                _load_any(out / f)
                counts["files"] += 1
            _check_saved_run(out / "items" / iid / "save")
    # Items cut short keep a `save` manifest of their own: it must list only complete files too.
    for save_manifest in out.glob("items/*/save/manifest.json"):
        iid = save_manifest.parent.parent.name
        if man is None or man["items"][iid]["status"] != "done":
            _check_saved_run(save_manifest.parent)
            counts["partial_saves"] += 1
    return counts


def _wait_for(cond, timeout: float, proc: subprocess.Popen[str]) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    return False


def _compare(ref: Path, got: Path) -> int:
    """Assert two finished runs have equal results; returns how many tensors were compared."""
    a, b = _manifest(ref), _manifest(got)
    assert a is not None and b is not None
    assert list(a["items"]) == list(b["items"])
    tensors = 0
    for iid, ra in a["items"].items():
        rb = b["items"][iid]
        assert ra["status"] == rb["status"] == "done"
        assert ra["files"] == rb["files"] and ra["tokens"] == rb["tokens"]
        ia, ib = Image.open(ref / "items" / iid / "image.png"), Image.open(got / "items" / iid / "image.png")
        assert np.array_equal(np.asarray(ia), np.asarray(ib)), iid
        sa, sb = load_run(ref / "items" / iid / "save"), load_run(got / "items" / iid / "save")
        assert [(e.site, e.step, e.tensor, e.index) for e in sa.entries] == [
            (e.site, e.step, e.tensor, e.index) for e in sb.entries
        ]
        for e in sa.entries:
            assert torch.equal(sa.get(e.site, e.step, e.tensor, e.index), sb.get(e.site, e.step, e.tensor, e.index))
            tensors += 1
        csv_a = (ref / "items" / iid / "stats" / "stats.csv").read_text()
        csv_b = (got / "items" / iid / "stats" / "stats.csv").read_text()
        assert csv_a == csv_b and len(csv_a.splitlines()) > 1
    return tensors


def test_sigkill_at_random_points_then_resume_equals_uninterrupted(experiment: Path) -> None:
    import resource

    rng = random.Random(SEED)
    work = experiment.parent
    ref, out = work / "reference", work / "killed"
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    reference = _run(experiment, ref)  # the uninterrupted run, alongside (checked at the end)

    kills: list[dict[str, object]] = []
    for k in range(KILLS):
        launched = time.time_ns()
        proc = _run(experiment, out)
        if k == 0:
            # The first kill lands early: while importing / loading the model, before any manifest.
            started, delay = False, rng.uniform(0.5, 3.0)
        else:
            # Wait until this process works on an item (the model is loaded), then kill it at a random
            # moment within about one item's time: mid-forward, mid-write of a save file or of a manifest...
            started = _wait_for(lambda t=launched: _started(out, t), 120, proc)
            if k == 2:  # this kill: first let the process finish one more item (a later point of the run)
                before = check_consistent(out)["done"]
                _wait_for(lambda n=before: check_consistent(out)["done"] > n, 120, proc)
            # Short enough that a kill finishes at most about one item on an idle machine (an item takes
            # ~0.45 s there), so work is left for every later kill; longer on a loaded one.
            delay = rng.uniform(0.0, 0.3)
        time.sleep(delay)
        alive = proc.poll() is None
        if alive:
            proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        counts = check_consistent(out)
        kills.append({"alive": alive, "in_item": started, "delay": round(delay, 3), **counts})
    man = _manifest(out)
    total = 6
    assert sum(bool(k["alive"]) for k in kills) >= 4, kills  # the kills landed while the run was working
    assert sum(bool(k["in_item"]) for k in kills) >= 3, kills

    proc = _run(experiment, out)
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    done_before = sum(r["status"] == "done" for r in man["items"].values()) if man else 0
    assert f"{total - done_before} item(s) run, {done_before} skipped" in stdout, stdout
    assert check_consistent(out)["done"] == total
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err
    assert not list((out / "items").glob(".discarded-*"))
    tensors = _compare(ref, out)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print(f"kill points: {len(kills)} ({sum(bool(k['alive']) for k in kills)} while running, "
          f"{sum(bool(k['in_item']) for k in kills)} inside an item), items done after each kill: "
          f"{[k['done'] for k in kills]}, {tensors} tensors compared; {time.monotonic() - t0:.1f} s wall, "
          f"{cpu:.1f} CPU s in 7 processes")  # fmt: skip


def _started(out: Path, since_ns: int) -> bool:
    """True once a process launched at `since_ns` has begun an unfinished item (created its folder)."""
    items = out / "items"
    if not items.is_dir():
        return False
    man = _manifest(out)
    for d in items.iterdir():
        if d.name.startswith("."):
            continue
        done = man is not None and man["items"].get(d.name, {}).get("status") == "done"
        try:
            if not done and d.stat().st_ctime_ns >= since_ns:
                return True
        except FileNotFoundError:  # being replaced right now
            continue
    return False
