"""`save` observer and `load_run`: files read back against independently recomputed tensors."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from attntrace import ConfigError, Observer, RunError, TraceConfig, Tracer, load_run
from attntrace.observers.save import Save
from tests.tiny import FAMILIES, run

ROOT = Path(__file__).resolve().parents[1]


class Capture(Observer):
    """Keeps q, k, v and mask of every call (fp32 copies) to recompute probabilities independently."""

    needs = frozenset({"query", "key", "value"})

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[tuple[str, int, int], dict[str, Any]] = {}

    def on_call(self, call: Any) -> None:
        self.calls[(call.site, call.step, call.index)] = {
            "query": call.query.detach().clone(),
            "key": call.key.detach().clone(),
            "value": call.value.detach().clone(),
            "mask": call.attn_mask,
            "scale": call.scale,
        }


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def reference_probs(c: dict[str, Any]) -> torch.Tensor:
    q, k = c["query"].double(), c["key"].double()
    scale = c["scale"] if c["scale"] is not None else 1 / math.sqrt(q.shape[-1])
    scores = q @ k.transpose(-1, -2) * scale
    if c["mask"] is not None:
        m = c["mask"]
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.double()
    return scores.softmax(-1).float()


def traced(tmp_path: Path, family: str = "sd15", steps: int = 1, **params: Any) -> tuple[Save, Capture]:
    model, inputs = FAMILIES[family]()
    tracer = Tracer(output_dir=tmp_path)
    saver = tracer.add("save", **params)
    cap = tracer.add(Capture())
    with tracer.attach(model):
        for _ in range(steps):
            run(model, inputs)
    tracer.save()
    tracer.close()
    assert isinstance(saver, Save)
    return saver, cap


def test_probs_and_qkv_round_trip(tmp_path: Path) -> None:
    _, cap = traced(tmp_path, tensors=["probs", "query", "key", "value"], queue_size=1)
    saved = load_run(tmp_path)  # the tracer's output_dir: finds the one saved run under save/
    assert saved.directory == tmp_path / "save"
    assert set(saved.tensors) == {"probs", "query", "key", "value"}
    assert len(saved.sites) == 8 and saved.steps == [0]
    for (site, step, index), c in cap.calls.items():
        probs = saved.get(site, step, "probs", index)
        assert probs.dtype == torch.float16
        ref = reference_probs(c)
        assert probs.shape == ref.shape
        torch.testing.assert_close(probs.float(), ref, atol=1e-3, rtol=1e-2)
        for name in ("query", "key", "value"):
            assert torch.equal(saved.get(site, step, name, index), c[name].half())


def test_float32_probs_exact(tmp_path: Path) -> None:
    _, cap = traced(tmp_path, family="sd3", dtype="float32")
    saved = load_run(tmp_path / "save")
    assert len(saved) == len(cap.calls) > 0
    for (site, step, index), c in cap.calls.items():
        torch.testing.assert_close(
            saved.get(site, step, "probs", index), reference_probs(c), atol=1e-6, rtol=1e-5
        )


def test_head_mean_cond_half_and_output(tmp_path: Path) -> None:
    _, cap = traced(tmp_path, tensors=["probs", "output"], head_mean=True, cond_half=True, dtype="float32")
    saved = load_run(tmp_path)
    for (site, step, index), c in cap.calls.items():
        ref = reference_probs(c)[1:]  # conditional half of a batch of 2
        probs = saved.get(site, step, "probs", index)
        assert probs.shape == (1, 1, *ref.shape[2:])
        torch.testing.assert_close(probs, ref.mean(dim=1, keepdim=True), atol=1e-6, rtol=1e-5)
        out_ref = (ref.double() @ c["value"][1:].double()).float().mean(dim=1, keepdim=True)
        torch.testing.assert_close(saved.get(site, step, "output", index), out_ref, atol=1e-5, rtol=1e-4)


def test_max_resolution_skips_large_grids(tmp_path: Path) -> None:
    traced(tmp_path, max_resolution=8)  # tiny sd15: 16x16 grids outside the mid block, 8x8 inside
    saved = load_run(tmp_path)
    assert saved.sites and all(s.startswith("mid_block.") for s in saved.sites)


class SlowSave(Save):
    """A saver whose disk is slow: shows that the queue bounds what the forward may leave pending."""

    name = "slow_save"

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.max_pending = 0

    def on_call(self, call: Any) -> None:
        super().on_call(call)
        assert self._queue is not None
        self.max_pending = max(self.max_pending, self._queue.qsize())

    def _write(self, item: dict[str, Any]) -> None:
        time.sleep(0.05)
        super()._write(item)


def test_bounded_queue_and_manifest(tmp_path: Path) -> None:
    model, inputs = FAMILIES["sd15"]()
    tracer = Tracer(output_dir=tmp_path)
    saver = tracer.add(SlowSave(queue_size=2, tensors=["probs", "key"]), match="*attn2")
    with tracer.attach(model):
        run(model, inputs)
        run(model, inputs)
    files = tracer.save()
    assert saver.max_pending <= 2
    doc = json.loads((tmp_path / "slow_save" / "manifest.json").read_text())
    entries = doc["entries"]
    assert len(entries) == 2 * 4 * 2  # steps x cross-attention sites x tensors
    assert {e["step"] for e in entries} == {0, 1}
    for e in entries:
        assert set(e) >= {"site", "step", "timestep", "index", "tensor", "shape", "dtype", "file", "key"}
        assert e["dtype"] == "float16" and e["timestep"] == 10.0 and not e["file"].startswith(".")
        assert (tmp_path / "slow_save" / e["file"]).is_file()
    assert set(files) == {tmp_path / "slow_save" / "manifest.json"} | {
        tmp_path / "slow_save" / e["file"] for e in entries
    }
    assert not [p for p in (tmp_path / "slow_save").iterdir() if ".tmp" in p.name]


class FailingSave(Save):
    """A saver whose disk fails on the second file."""

    name = "failing_save"
    written = 0

    def _write(self, item: dict[str, Any]) -> None:
        self.written += 1
        if self.written >= 2:
            raise OSError(28, "No space left on device")
        super()._write(item)


def test_writer_failure_surfaces_without_deadlock(tmp_path: Path) -> None:
    model, inputs = FAMILIES["sd15"]()
    tracer = Tracer(output_dir=tmp_path)
    saver = tracer.add(FailingSave(queue_size=1))
    with pytest.raises(RunError, match="No space left"), tracer.attach(model):
        for _ in range(3):  # the writer keeps draining after failing: the forward never blocks forever
            run(model, inputs)
    saver.close()  # the failure was already reported: closing does not raise it again
    saved = load_run(tmp_path)  # what landed before the failure is listed and readable
    assert len(saved.entries) == 1
    e = saved.entries[0]
    assert saved.get(e.site, e.step, e.tensor, e.index).shape == e.shape


def test_truncated_file_names_it_and_others_load(tmp_path: Path) -> None:
    traced(tmp_path, tensors=["probs"])
    saved = load_run(tmp_path)
    victim = saved.entries[0]
    path = saved.directory / victim.file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RunError, match=re.escape(victim.file)):
        saved.get(victim.site, victim.step, "probs", victim.index)
    for e in saved.entries[1:]:
        assert saved.get(e.site, e.step, e.tensor, e.index).shape == e.shape
    path.write_bytes(b"\x00" * 3)  # garbage, too short for a header
    with pytest.raises(RunError, match=re.escape(victim.file)):
        saved.get(victim.site, victim.step, "probs", victim.index)
    with pytest.raises(RunError, match="no 'probs' saved"):
        saved.get("nope", 0)


def test_missing_or_corrupt_manifest(tmp_path: Path) -> None:
    with pytest.raises(RunError, match=r"manifest\.json"):
        load_run(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(RunError, match=r"manifest\.json"):
        load_run(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"entries": [{"site": "a"}]}))
    with pytest.raises(RunError, match="entry 0 lacks"):
        load_run(tmp_path)
    bad = {"site": "a", "step": 0, "index": 0, "tensor": "probs", "shape": [1], "dtype": "float16"}
    (tmp_path / "manifest.json").write_text(
        json.dumps({"entries": [{**bad, "file": "../x", "key": "probs"}]})
    )
    with pytest.raises(RunError, match="outside"):
        load_run(tmp_path)


def test_yaml_and_missing_directory(tmp_path: Path) -> None:
    cfg = TraceConfig.from_yaml(
        "rules:\n  - use: save\n    match: 'mid_block.*'\n    with: {tensors: [value], dtype: bfloat16, dir: "
        + json.dumps(str(tmp_path / "run"))
        + "}\n"
    )
    model, inputs = FAMILIES["sd15"]()
    tracer = Tracer(cfg)
    with tracer.attach(model):
        run(model, inputs)
    tracer.close()
    saved = load_run(tmp_path / "run")
    assert saved.tensors == ["value"] and all(s.startswith("mid_block") for s in saved.sites)
    assert saved.get(saved.sites[0], 0, "value").dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="tensors"):
        Tracer({"rules": [{"use": "save", "with": {"tensors": ["weights"]}}]})
    with pytest.raises(ConfigError, match="queue_size"):
        Save(queue_size=0)
    no_dir = Tracer()
    no_dir.add("save")
    with pytest.raises(ConfigError, match="directory"):
        no_dir.attach(model)
    assert no_dir.attachment is None  # attach failed cleanly


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from attntrace import Tracer
    from tests.tiny import FAMILIES, run
    torch.set_num_threads(1)
    model, inputs = FAMILIES["sd15"]()
    tracer = Tracer(output_dir=sys.argv[1])
    tracer.add("save", tensors=["probs", "query", "key", "value"], dtype="float32", queue_size=2)
    with tracer.attach(model):
        for _ in range(1000):
            run(model, inputs)
    """
)


def test_sigkill_mid_run_leaves_valid_run(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)], cwd=ROOT, env=env)
    manifest = tmp_path / "save" / "manifest.json"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if (
                manifest.exists()
                and len({e["file"] for e in json.loads(manifest.read_text())["entries"]}) >= 12
            ):
                break
            assert proc.poll() is None, "the writer process ended early"
            time.sleep(0.05)
        else:
            pytest.fail("the run did not write 12 files in time")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = load_run(tmp_path)
    assert len({e.file for e in saved.entries}) >= 12
    for e in saved.entries:
        assert ".tmp" not in e.file
        t = saved.get(e.site, e.step, e.tensor, e.index)
        assert t.shape == e.shape and t.dtype == torch.float32 and torch.isfinite(t).all()
