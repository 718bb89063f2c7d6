"""`heatmap` on every text-conditioned diffusers family (tiny configs from tests/coverage_models.py).

For each class with cross or joint attention, the heat map is compared with a reference recomputed
from the probabilities of every call: the head mean of the image-query x text-key block named by the
call's layout, reshaped to the layout's grid (frames, h, w), upsampled per frame and averaged over calls
(video: per frame, and the frame average). A class whose calls name no text at all must be listed in
`NO_TEXT` with the reason, so no family drops out silently.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from attntrace import Observer, Tracer, find_sites
from tests.coverage_models import CASES

pytest.importorskip("diffusers")

RES = 8
# Classes with cross/joint sites where no call gives text keys over a known image grid, and why (the
# heat map warns per site there, naming the reason).
NO_TEXT: dict[str, str] = {
    "PRXTransformer2DModel": "keys join image and text tokens inside the processor; order not read",
    "NucleusMoEImageTransformer2DModel": "keys join image and text tokens inside the processor; order not read",
    "Cosmos3OmniTransformer": "this tiny config passes no text to its joint sequence",
    "StableAudio3DiTModel": "audio latents: a 1D sequence, no image grid",
    "LongCatAudioDiTTransformer": "audio latents: a 1D sequence, no image grid",
    "AnimaTextConditioner": "a text conditioner: its queries are text tokens",
    "SanaWMLTX2RefinerTransformer3DModel": "packed (B, L, C) latents of one AR block: (frames, h, w) is only in its "
    "precomputed RoPE tables",
}
# Classes whose joint layout cannot be known (the heat map is refused at attach there, by site name).
UNKNOWN: set[str] = {"ZImageTransformer2DModel", "ZImageControlNetModel", "OmniGenTransformer2DModel"}


def _conditioned() -> list[str]:
    out = []
    for name, build in CASES.items():
        if name in UNKNOWN:
            continue
        model, _ = build()
        if any(s.kind in ("cross", "joint") for s in find_sites(model)):
            out.append(name)
    return out


class _Probs(Observer):
    needs = frozenset({"probs"})

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, Any]] = []

    def on_call(self, call: Any) -> None:
        lay = call.layout
        if lay.kind in ("cross", "joint") and lay.known and lay.text is not None and lay.grid is not None:
            self.calls.append((call.probs.detach().clone(), lay))


def _reference(calls: list[tuple[torch.Tensor, Any]]) -> torch.Tensor:
    maps = []
    for probs, lay in calls:
        f, h, w = lay.grid
        block = probs[:, :, lay.image, lay.text].mean(dim=1)  # (B, image, text)
        b, _, t = block.shape
        m = block.transpose(1, 2).reshape(b, t * f, h, w)
        m = F.interpolate(m, size=(RES, RES), mode="bilinear", align_corners=False).reshape(b, t, f, RES, RES)
        maps.append(m)
    return torch.stack(maps).mean(0)


@pytest.mark.parametrize("case", _conditioned())
def test_heatmap_equals_reference_from_layout(case: str) -> None:
    torch.manual_seed(0)
    model, inputs = CASES[case]()
    tracer = Tracer()
    kinds = ["cross", "joint"]  # linear sites have no probabilities
    heat = tracer.add("heatmap", kind=kinds, resolution=RES, cond_half=False, skip_lowest=False)
    probs = tracer.add(_Probs(), kind=kinds)
    with tracer.attach(model), torch.no_grad():
        model(**inputs)
    res = heat.result()
    if case in NO_TEXT:
        assert not probs.calls and res["maps"] is None
        return
    assert probs.calls, f"{case}: no call named text keys and an image grid (add it to NO_TEXT with the reason)"
    # One heat map per text length and frame count: the reference uses the same calls.
    ref = _reference(probs.calls)
    assert res["count"] == len(probs.calls)
    torch.testing.assert_close(res["maps"], ref.mean(dim=2), atol=1e-5, rtol=1e-4)
    if ref.shape[2] > 1:
        torch.testing.assert_close(res["frames"], ref, atol=1e-5, rtol=1e-4)
    else:
        assert "frames" not in res


@pytest.mark.parametrize("case", sorted(UNKNOWN))
def test_heatmap_refused_where_layout_unknown(case: str) -> None:
    from attntrace import SelectionError

    model, _ = CASES[case]()
    unknown = [s.name for s in find_sites(model) if s.layout.startswith("unknown")]
    assert unknown
    with pytest.raises(SelectionError, match="needs the token layout"):
        Tracer({"rules": [{"use": "heatmap", "match": unknown[0]}]}).attach(model)
