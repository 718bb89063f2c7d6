"""`stats` observer: values against an independent unchunked softmax, reductions, YAML, files."""

from __future__ import annotations

import csv
import math
from typing import Any

import pytest
import torch

from attntrace import ConfigError, Observer, TraceConfig, Tracer
from attntrace.observers.stats import Stats
from tests.tiny import FAMILIES, run

TINY_MIB = 0.2  # ~200 KiB: tens of query chunks (and a ragged last one) even on the tiny models


class Capture(Observer):
    """Keeps each call's q, k, mask and scale to recompute the statistics independently."""

    needs = frozenset({"query", "key"})

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []

    def on_call(self, call: Any) -> None:
        self.calls.append(
            {
                "site": call.site, "index": call.index, "step": call.step, "kind": call.kind,
                "q": call.query.detach().clone(), "k": call.key.detach().clone(), "mask": call.attn_mask,
                "scale": call.scale, "text": call.text_tokens, "image": call.image_tokens,
            }
        )  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def reference_probs(c: dict[str, Any]) -> torch.Tensor:
    """Plain softmax(q kᵀ · scale + mask), written here without attntrace.kernel."""
    q, k = c["q"].double(), c["k"].double()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = c["scale"] if c["scale"] is not None else 1 / math.sqrt(q.shape[-1])
    scores = q @ k.transpose(-1, -2) * scale
    m = c["mask"]
    if m is not None:
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.double()
    return scores.softmax(-1)


def reference_metrics(c: dict[str, Any], topk: int, tokens: list[int]) -> dict[str, torch.Tensor]:
    p = reference_probs(c)
    out = {
        "entropy": (-(p * p.clamp_min(1e-300).log()).sum(-1)).mean(-1),
        "max": p.max(-1).values.mean(-1),
        "mean": p.mean(dim=(-1, -2)),
        "topk_mass": p.sort(-1, descending=True).values[..., :topk].sum(-1).mean(-1),
    }
    if tokens and c["text"] is not None:
        keys = [c["text"].start + t for t in tokens]
        rows = p[..., c["image"], :] if c["kind"] == "joint" else p
        out["token_mass"] = rows[..., keys].sum(-1).mean(-1)
    return out


def traced(family: str, **params: Any) -> tuple[Stats, Capture, torch.nn.Module]:
    model, inputs = FAMILIES[family]()
    tracer = Tracer()
    stats = tracer.add("stats", **params)
    cap = tracer.add(Capture())
    with tracer.attach(model):
        run(model, inputs)
    return stats, cap, model


def table(stats: Stats) -> dict[tuple[Any, ...], float]:
    return {
        (r["site"], r["index"], r["step"], r["batch"], r["head"], r["metric"]): r["value"]
        for r in stats.result()
    }


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux"])
def test_values_match_unchunked_reference(family: str) -> None:
    metrics = ["entropy", "max", "mean", "topk_mass", "token_mass"]
    stats, cap, _ = traced(family, max_chunk_mib=TINY_MIB, metrics=metrics, topk=3, tokens=[0, 2])
    got = table(stats)
    assert cap.calls
    checked: set[str] = set()
    for c in cap.calls:
        ref = reference_metrics(c, 3, [0, 2])
        for metric, values in ref.items():
            for b in range(values.shape[0]):
                for h in range(values.shape[1]):
                    key = (c["site"], c["index"], c["step"], b, h, metric)
                    assert got[key] == pytest.approx(float(values[b, h]), abs=1e-5, rel=1e-5), key
                    checked.add(metric)
    assert checked == set(metrics)  # token_mass reached: cross (sd15) or joint (sd3, flux) sites
    # Nothing extra: every row has a reference.
    n_ref = sum(v.numel() for c in cap.calls for v in reference_metrics(c, 3, [0, 2]).values())
    assert len(got) == n_ref


def test_chunking_does_not_change_values() -> None:
    small, _, _ = traced("sd15", max_chunk_mib=TINY_MIB)
    big, _, _ = traced("sd15")
    a, b = table(small), table(big)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-6)


def test_token_mass_on_cross_attention_only() -> None:
    stats, cap, _ = traced("sd15", metrics=["token_mass"], tokens=[1, 3], max_chunk_mib=0.001)
    rows = stats.result()
    assert rows and {r["kind"] for r in rows} == {"cross"}
    for c in (c for c in cap.calls if c["kind"] == "cross"):
        p = reference_probs(c)
        expected = p[..., [1, 3]].sum(-1).mean(-1)
        for r in (r for r in rows if r["site"] == c["site"]):
            assert r["value"] == pytest.approx(float(expected[r["batch"], r["head"]]), abs=1e-6)


def test_token_index_out_of_range_is_an_error() -> None:
    model, inputs = FAMILIES["sd15"]()
    tracer = Tracer()
    tracer.add("stats", match="*attn2", metrics=["token_mass"], tokens=[7])  # 7 text tokens: 0..6
    with pytest.raises(ConfigError, match="token index 7"), tracer.attach(model):
        run(model, inputs)


def test_reductions_and_cond_half() -> None:
    full, cap, _ = traced("sd15", max_chunk_mib=0.05)
    per_head = table(full)
    red, _, _ = traced("sd15", reduce_heads=True, reduce_batch=True, cond_half=True, max_chunk_mib=0.05)
    rows = red.result()
    assert rows and all(r["batch"] == "mean" and r["head"] == "mean" for r in rows)
    heads = {c["site"]: c["q"].shape[1] for c in cap.calls}
    for r in rows:
        # Conditional half of batch 2 is batch item 1: the mean over its heads.
        vals = [
            per_head[(r["site"], r["index"], r["step"], 1, h, r["metric"])] for h in range(heads[r["site"]])
        ]
        assert r["value"] == pytest.approx(sum(vals) / len(vals), abs=1e-6)
    half, _, _ = traced("sd15", cond_half=True, metrics=["max"])
    assert {r["batch"] for r in half.result()} == {1}


def test_cond_half_needs_even_batch() -> None:
    with pytest.raises(ConfigError, match="even"):
        traced("flux", cond_half=True)  # tiny flux has batch 1


def test_yaml_config_csv_and_png(tmp_path: Any) -> None:
    cfg = TraceConfig.from_yaml(
        "rules:\n"
        "  - use: stats\n"
        "    match: '*attn1'\n"
        "    kind: self\n"
        "    with: {metrics: [entropy, max], max_chunk_mib: 0.1, reduce_heads: true}\n"
    )
    model, inputs = FAMILIES["sd15"]()
    tracer = Tracer(cfg, output_dir=tmp_path)
    with tracer.attach(model):
        run(model, inputs)
        run(model, inputs)
    files = tracer.save()
    stats = tracer.observers["stats"]
    assert isinstance(stats, Stats)
    csv_path, png_path = tmp_path / "stats" / "stats.csv", tmp_path / "stats" / "stats.png"
    assert set(files) == {csv_path, png_path}
    with csv_path.open() as fh:
        back = list(csv.DictReader(fh))
    expected = stats.result()
    assert len(back) == len(expected) > 0
    assert {r["step"] for r in back} == {"0", "1"}
    for a, b in zip(back, expected):
        assert a["site"] == b["site"] and a["metric"] == b["metric"] and a["head"] == "mean"
        assert float(a["value"]) == pytest.approx(b["value"], rel=1e-12)
    data = png_path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png_path) as im:
        im.verify()
    frame = stats.to_frame()
    assert list(frame.columns)[:2] == ["site", "index"] and len(frame) == len(expected)


def test_parquet(tmp_path: Any) -> None:
    pytest.importorskip("pyarrow")
    stats, _, _ = traced("sd15", format="parquet", metrics=["max"])
    stats.save(tmp_path)
    import pyarrow.parquet as pq

    t = pq.read_table(tmp_path / "stats.parquet").to_pylist()
    assert [r["value"] for r in t] == [r["value"] for r in stats.result()]


def test_params_validation() -> None:
    with pytest.raises(ConfigError, match="max_chunk_mib"):
        Tracer({"rules": [{"use": "stats", "with": {"max_chunk_mib": 0}}]})
    with pytest.raises(ConfigError, match="metrics"):
        Tracer({"rules": [{"use": "stats", "with": {"metrics": ["median"]}}]})
    with pytest.raises(ConfigError, match="unknown parameter"):
        Stats(chunk=3)
    with pytest.raises(ConfigError, match="needs tokens"):
        Stats(metrics=["token_mass"])
