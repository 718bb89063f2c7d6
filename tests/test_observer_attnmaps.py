"""`attnmaps`: per (step, group) maps equal a reference computed from every call's full probabilities."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from attntrace import Observer, Tracer, load_run
from attntrace.observers.attnmaps import AttnMaps, site_group
from tests.tiny import FAMILIES, run


class Collect(Observer):
    needs = frozenset({"probs"})

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []

    def on_call(self, call: Any) -> None:
        self.calls.append({"p": call.probs.clone(), "hw": call.image_hw, "text": call.text_tokens,
                           "image": call.image_tokens, "site": call.site, "step": call.step,
                           "kind": call.kind})  # fmt: skip


@pytest.mark.parametrize("family", ["sd15", "sd3"])
@pytest.mark.parametrize("heads", [False, True])
def test_maps_equal_reference(family: str, heads: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, inputs = FAMILIES[family]()
    tracer = Tracer()
    maps = tracer.add(AttnMaps(resolution=8, heads=heads, max_tokens=5), kind=["cross", "joint"])
    ref = tracer.add(Collect(), kind=["cross", "joint"])
    with tracer.attach(model):
        run(model, inputs)
        run(model, inputs)
    res = maps.result()
    want: dict[tuple[int, str], list[torch.Tensor]] = {}
    for c in ref.calls:
        if c["hw"] is None or c["text"] is None:
            continue
        p = c["p"]
        p = p[p.shape[0] // 2 :] if p.shape[0] % 2 == 0 else p
        img = c["image"] or slice(0, p.shape[-2])
        sub = p[:, :, img, c["text"]][..., :5]  # (B, H, img, T)
        if not heads:
            sub = sub.mean(1, keepdim=True)
        b, h, n, t = sub.shape
        m = sub.permute(0, 1, 3, 2).reshape(b * h, t, *c["hw"])
        m = F.interpolate(m, size=(8, 8), mode="bilinear", align_corners=False).reshape(b, h, t, 8, 8)
        want.setdefault((c["step"], site_group(c["site"])), []).append(m if heads else m[:, 0])
    assert res["kind"] == "image" and res["steps"] == [0, 1]
    assert set(res["groups"]) == {g for _, g in want}
    for (s, g), ms in want.items():
        i, j = res["steps"].index(s), res["groups"].index(g)
        got = res["maps"][i, j].float()
        exp = torch.stack(ms).mean(0)
        got = got[tuple(slice(0, n) for n in exp.shape)]
        assert res["present"][i, j]
        torch.testing.assert_close(got, exp, atol=2e-3, rtol=1e-2)  # float16 storage
    files = tracer.save(tmp_path)
    back = load_run(tmp_path / "attnmaps")
    assert files and back["steps"] == [0, 1] and torch.equal(back["maps"], res["maps"])


def test_bounded_by_max_mib() -> None:
    model, inputs = FAMILIES["sd15"]()
    tracer = Tracer()
    maps = tracer.add(AttnMaps(resolution=16, max_mib=0.01, group="site"), kind="cross")
    with tracer.attach(model), pytest.warns(RuntimeWarning, match="max_mib"):
        for _ in range(3):
            run(model, inputs)
    res = maps.result()
    assert res["truncated"] and maps.bytes <= 0.01 * 2**20


def test_site_groups() -> None:
    assert site_group("down_blocks.1.attentions.0.transformer_blocks.0.attn2") == "down_blocks.1"
    assert site_group("mid_block.attentions.0.transformer_blocks.0.attn2") == "mid_block"
    assert site_group("transformer_blocks.7.attn") == "transformer_blocks.7"
    assert site_group("encoder.layer.3.attention.self") == "encoder.layer.3"
    assert site_group("x.attn", "site") == "x.attn" and site_group("x", "all") == "all"
