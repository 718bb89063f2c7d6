"""Token layouts checked against an independent reconstruction, family by family (tiny configs).

Which key rows are the prompt's is measured, not assumed: the model runs three times — as built, with
noise added to its text input (`encoder_hidden_states`, or the first text encoder's states), and with
noise added to its latents. At an attention call where the two streams have not mixed yet (the first
block that sees both), the key rows that change with the text are the text tokens and those that change
with the latents are the image tokens. The layout the adapter resolved must name exactly those rows
(text keys, image keys and, for joint attention, the same rows on the query axis). Registers and other
tokens of the model's own change with neither and belong to neither range.

Single-stream blocks come after the double-stream ones in Flux, Flux2, Chroma, HiDream, HunyuanVideo and
AuraFlow, so their streams are already mixed there; those cases run with the double-stream blocks
removed (an empty list), so the first single-stream block is the first to see both streams.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from attntrace import Tracer, find_sites
from tests.coverage_models import CASES
from tests.layout_probe import changed_rows, record_calls

pytest.importorskip("diffusers")

# (case, double-stream block lists to empty, text input to perturb, latent input to perturb)
FAMILIES: list[tuple[str, tuple[str, ...], str, str]] = [
    ("UNet2DConditionModel", (), "encoder_hidden_states", "sample"),
    ("PixArtTransformer2DModel", (), "encoder_hidden_states", "hidden_states"),
    ("SanaTransformer2DModel", (), "encoder_hidden_states", "hidden_states"),
    ("SD3Transformer2DModel", (), "encoder_hidden_states", "hidden_states"),
    ("FluxTransformer2DModel", (), "encoder_hidden_states", "hidden_states"),
    ("FluxTransformer2DModel", ("transformer_blocks",), "encoder_hidden_states", "hidden_states"),
    ("Flux2Transformer2DModel", ("transformer_blocks",), "encoder_hidden_states", "hidden_states"),
    ("ChromaTransformer2DModel", ("transformer_blocks",), "encoder_hidden_states", "hidden_states"),
    ("AuraFlowTransformer2DModel", ("joint_transformer_blocks",), "encoder_hidden_states", "hidden_states"),
    ("HiDreamImageTransformer2DModel", ("double_stream_blocks",), "encoder_hidden_states_t5", "hidden_states"),
    ("HunyuanVideoTransformer3DModel", (), "encoder_hidden_states", "hidden_states"),
    ("HunyuanVideoTransformer3DModel", ("transformer_blocks",), "encoder_hidden_states", "hidden_states"),
    ("CogVideoXTransformer3DModel", (), "encoder_hidden_states", "hidden_states"),
    ("CogView3PlusTransformer2DModel", (), "encoder_hidden_states", "hidden_states"),
    ("CogView4Transformer2DModel", (), "encoder_hidden_states", "hidden_states"),
    ("ConsisIDTransformer3DModel", (), "encoder_hidden_states", "hidden_states"),
    ("Lumina2Transformer2DModel", (), "encoder_hidden_states", "hidden_states"),
    ("QwenImageTransformer2DModel", (), "encoder_hidden_states", "hidden_states"),
    ("WanTransformer3DModel", (), "encoder_hidden_states", "hidden_states"),
    ("LTXVideoTransformer3DModel", (), "encoder_hidden_states", "hidden_states"),
    ("Kandinsky5Transformer3DModel", (), "encoder_hidden_states", "hidden_states"),
    ("HunyuanVideoFramepackTransformer3DModel", (), "encoder_hidden_states", "hidden_states"),
    ("HunyuanVideoFramepackTransformer3DModel", ("transformer_blocks",), "encoder_hidden_states", "hidden_states"),
    ("JoyImageEditTransformer3DModel", (), "encoder_hidden_states", "hidden_states"),
]
# Not checkable this way (tests/test_layout_frames.py checks their image ranges patch by patch): Kandinsky 6's
# audio stream queries the text too (no image queries), JoyImage-Edit-Plus packs its reference images into
# `hidden_states`, Bria-Fibo 2's injection blocks see gist and image tokens mixed, Wan-Animate 2 takes lists.
# Not checkable this way: Mochi pools the caption into the timestep embedding that modulates the image
# stream, so every image key row follows the text too (no call keeps the streams apart).


def _rows(s: slice | None) -> set[int]:
    return set() if s is None else set(range(s.start, s.stop))


def _noisy(inputs: dict[str, Any], name: str) -> dict[str, Any]:
    g = torch.Generator().manual_seed(7)
    out = dict(inputs)
    x = inputs[name]
    out[name] = x + torch.randn(x.shape, generator=g, dtype=x.dtype)
    return out


@pytest.mark.parametrize(("case", "drop", "text_input", "latent_input"), FAMILIES,
                         ids=[f"{c}{'-single' if d else ''}" for c, d, _, _ in FAMILIES])  # fmt: skip
def test_layout_matches_which_rows_come_from_text_and_latents(
    case: str, drop: tuple[str, ...], text_input: str, latent_input: str
) -> None:
    torch.manual_seed(0)
    model, inputs = CASES[case]()
    for attr in drop:
        setattr(model, attr, torch.nn.ModuleList())
    assert text_input in inputs and latent_input in inputs, sorted(inputs)
    base = record_calls(model, inputs)
    by_text = record_calls(model, _noisy(inputs, text_input))
    by_latent = record_calls(model, _noisy(inputs, latent_input))
    assert len(base) == len(by_text) == len(by_latent) > 0
    checked = []
    for (site, index, q0, k0, layout), (_, _, q1, k1, _), (_, _, q2, k2, _) in zip(base, by_text, by_latent):
        if layout.kind not in ("cross", "joint"):
            continue
        text_keys, image_keys = changed_rows(k0, k1), changed_rows(k0, k2)
        if text_keys & image_keys:
            continue  # the streams have mixed in an earlier block: no independent reading here
        assert layout.known, f"{case} {site}: layout unknown ({layout.note})"
        where = f"{case} {site}[{index}] {layout.describe()}"
        if not text_keys:
            assert layout.text is None, f"{where}: no key row follows the text, but the layout names text"
            continue
        assert _rows(layout.text) == text_keys, f"{where}: text rows measured {sorted(text_keys)}"
        if layout.kind == "joint":
            assert _rows(layout.image) == image_keys, f"{where}: image rows measured {sorted(image_keys)}"
            assert changed_rows(q0, q1) == text_keys and changed_rows(q0, q2) == image_keys, f"{where}: query axis"
        else:
            assert not image_keys, f"{where}: cross-attention keys follow the latents"
            assert _rows(layout.image) == changed_rows(q0, q2), f"{where}: image query rows"
        grid = layout.grid
        assert grid is not None and grid[0] * grid[1] * grid[2] == len(_rows(layout.image)), where
        checked.append((site, layout.kind))
    assert checked, f"{case}: no call where text and latents were still apart"
    if drop:  # the single-stream block itself was checked
        assert any("single" in site for site, _ in checked), checked


def test_single_stream_sites_are_joint_for_kind_rules() -> None:
    # `kind: joint` selects Flux's single-stream blocks (they were reported as self before).
    model, _ = CASES["FluxTransformer2DModel"]()
    kinds = {s.name: s.kind for s in find_sites(model)}
    singles = [n for n in kinds if n.startswith("single_transformer_blocks")]
    assert singles and all(kinds[n] == "joint" for n in singles)
    site = next(s for s in find_sites(model) if s.name == singles[0])
    assert site.layout == "text first, joined by the block"


def test_video_grid_is_frames_height_width() -> None:
    model, inputs = CASES["WanTransformer3DModel"]()
    calls = record_calls(model, inputs)
    x = inputs["hidden_states"]  # (B, C, F, H, W), patch (1, 2, 2)
    expected = (x.shape[2], x.shape[3] // 2, x.shape[4] // 2)
    grids = {layout.grid for _, _, _, _, layout in calls}
    assert grids == {expected}


def test_unknown_layout_refuses_layout_observers_by_name() -> None:
    from attntrace import SelectionError

    model, _ = CASES["ZImageTransformer2DModel"]()
    site = next(s for s in find_sites(model) if s.name.startswith("layers."))
    assert site.kind == "joint" and site.layout.startswith("unknown")
    with pytest.raises(SelectionError, match=r"needs the token layout.*layers\.0\.attention"):
        Tracer({"rules": [{"use": "heatmap", "match": "layers.*"}]}).attach(model)
