"""Frame grids of the video and packed-stream families, checked cell by cell against the latents.

Each case perturbs one latent patch — frame f, patch row y, patch column x, sized by the family's patch
sizes, computed here from the config — and finds the attention calls where exactly one key row changes
(before any attention has mixed the tokens). That row must be the token the layout puts at (f, y, x):
`image.start + (f·h + y)·w + x` with `(frames, h, w)` the grid computed here from the latent shape and
patch sizes. Tokens the family packs with the generated ones (Framepack's history frames,
JoyImage-Edit-Plus's reference images, Bria-Fibo 2's gist latents) follow other inputs and must stay
outside the image range: the latent-changed key rows at those calls are exactly the image range.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from tests.coverage_models import CASES
from tests.layout_probe import changed_rows as _changed
from tests.layout_probe import record_calls

pytest.importorskip("diffusers")

Inputs = dict[str, Any]
Cell = tuple[int, int, int]


def _run(model: torch.nn.Module, inputs: Inputs) -> list[tuple[str, torch.Tensor, Any]]:
    return [(site, k, layout) for site, _, _, k, layout in record_calls(model, inputs)]


def _bump(t: torch.Tensor, index: tuple[Any, ...]) -> torch.Tensor:
    out = t.clone()
    out[index] += 1.0 + torch.rand(out[index].shape, generator=torch.Generator().manual_seed(3))
    return out


# Per family: build (model, inputs), the expected grid (frames, h, w) computed from the latent shape and the
# patch sizes, and a function giving inputs with one latent patch (f, y, x) of the generated image changed.
Case = tuple[torch.nn.Module, Inputs, tuple[int, int, int], Callable[[Cell], Inputs]]


def _kandinsky(name: str) -> Case:
    model, inputs = CASES[name]()
    x = inputs["hidden_states"]  # (B, F, H, W, C), channels last
    pt, ph, pw = model.config.patch_size
    grid = (x.shape[1] // pt, x.shape[2] // ph, x.shape[3] // pw)

    def at(cell: Cell) -> Inputs:
        f, y, x_ = cell
        sl = (slice(None), slice(f * pt, (f + 1) * pt), slice(y * ph, (y + 1) * ph), slice(x_ * pw, (x_ + 1) * pw))
        return {**inputs, "hidden_states": _bump(x, sl)}

    return model, inputs, grid, at


def _wan_animate2() -> Case:
    model, inputs = CASES["WanAnimate2Transformer3DModel"]()
    x = inputs["hidden_states"][0]  # unbatched (C, F, H, W)
    pt, ph, pw = model.config.patch_size
    grid = (x.shape[1] // pt, x.shape[2] // ph, x.shape[3] // pw)

    def at(cell: Cell) -> Inputs:
        f, y, x_ = cell
        sl = (slice(None), slice(f * pt, (f + 1) * pt), slice(y * ph, (y + 1) * ph), slice(x_ * pw, (x_ + 1) * pw))
        return {**inputs, "hidden_states": [_bump(x, sl)]}

    return model, inputs, grid, at


def _framepack(single: bool) -> Case:
    model, inputs = CASES["HunyuanVideoFramepackTransformer3DModel"]()
    if single:  # the single-stream block first sees the joined sequence
        model.transformer_blocks = torch.nn.ModuleList()
    x = inputs["hidden_states"]  # (B, C, F, H, W); the history latents come in separate inputs
    p, pt = model.config.patch_size, model.config.patch_size_t
    grid = (x.shape[2] // pt, x.shape[3] // p, x.shape[4] // p)

    def at(cell: Cell) -> Inputs:
        f, y, x_ = cell
        sl = (slice(f * pt, (f + 1) * pt), slice(y * p, (y + 1) * p), slice(x_ * p, (x_ + 1) * p))
        return {**inputs, "hidden_states": _bump(x, (slice(None), slice(None), *sl))}

    return model, inputs, grid, at


def _joyimage_edit_plus() -> Case:
    model, _ = CASES["JoyImageEditPlusTransformer3DModel"]()
    t, h, w = 1, 2, 3  # the target image's patch grid; one reference image of 1 x 2 x 2 patches after it
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, t * h * w + 4, 4, 1, 2, 2, generator=g)  # (B, patches, C, pt, ph, pw), target first
    inputs = {"hidden_states": x, "encoder_hidden_states": torch.randn(1, 5, 16, generator=g),
              "timestep": torch.tensor([1.0]), "shape_list": [[(t, h, w), (1, 2, 2)]]}  # fmt: skip

    def at(cell: Cell) -> Inputs:
        f, y, x_ = cell
        return {**inputs, "hidden_states": _bump(x, (slice(None), (f * h + y) * w + x_))}

    return model, inputs, (t, h, w), at


def _bria_fibo2() -> Case:
    model, inputs = CASES["BriaFibo2Transformer2DModel"]()
    model.noise_refiner = torch.nn.ModuleList()  # the main blocks first see gist and image tokens unmixed
    x = inputs["hidden_states"]  # (B, C, H, W)
    p = model.config.patch_size
    grid = (1, x.shape[2] // p, x.shape[3] // p)

    def at(cell: Cell) -> Inputs:
        _, y, x_ = cell
        return {**inputs, "hidden_states": _bump(x, (slice(None), slice(None), slice(y * p, (y + 1) * p),
                                                      slice(x_ * p, (x_ + 1) * p)))}  # fmt: skip

    return model, inputs, grid, at


CASES_FRAMES: dict[str, Callable[[], Case]] = {
    "Kandinsky5Transformer3DModel": lambda: _kandinsky("Kandinsky5Transformer3DModel"),
    "Kandinsky6Transformer3DModel": lambda: _kandinsky("Kandinsky6Transformer3DModel"),
    "WanAnimate2Transformer3DModel": _wan_animate2,
    "HunyuanVideoFramepackTransformer3DModel": lambda: _framepack(False),
    "HunyuanVideoFramepackTransformer3DModel-single": lambda: _framepack(True),
    "JoyImageEditPlusTransformer3DModel": _joyimage_edit_plus,
    "BriaFibo2Transformer2DModel": _bria_fibo2,
}


@pytest.mark.parametrize("case", sorted(CASES_FRAMES))
def test_each_latent_patch_is_the_token_the_grid_names(case: str) -> None:
    torch.manual_seed(0)
    model, inputs, grid, at = CASES_FRAMES[case]()
    frames, h, w = grid
    base = _run(model, inputs)
    assert any(layout.grid is not None for _, _, layout in base), f"{case}: no call has a grid"
    cells = {(0, 0, 0), (frames - 1, h - 1, 0), (frames - 1, 0, w - 1), (frames // 2, h // 2, w // 2)}
    checked = 0
    for cell in sorted(cells):
        f, y, x = cell
        moved = _run(model, at(cell))
        for (site, k0, layout), (_, k1, _) in zip(base, moved):
            rows = _changed(k0, k1)
            if len(rows) != 1 or layout.image is None or k0.shape[-2] < layout.image.stop:
                continue  # not an image-keyed call, or the tokens have mixed already
            assert layout.grid == grid, f"{case} {site}: {layout.describe()}, expected grid {grid}"
            expected = layout.image.start + (f * h + y) * w + x
            assert rows == {expected}, f"{case} {site} cell {cell}: key row {rows} changed, layout names {expected}"
            checked += 1
    assert checked >= len(cells), f"{case}: only {checked} calls checked"


@pytest.mark.parametrize("case", ["HunyuanVideoFramepackTransformer3DModel", "JoyImageEditPlusTransformer3DModel",
                                  "BriaFibo2Transformer2DModel"])  # fmt: skip
def test_packed_conditioning_tokens_are_outside_the_image_range(case: str) -> None:
    # The whole generated latent perturbed: the key rows that follow it are the image range, no more (history,
    # reference and gist tokens come from other inputs).
    torch.manual_seed(0)
    model, inputs, grid, _ = CASES_FRAMES[case]()
    name = "hidden_states"
    g = torch.Generator().manual_seed(5)
    if case.startswith("JoyImage"):  # only the target's patches are the generated latent
        n = grid[0] * grid[1] * grid[2]
        noisy = _bump(inputs[name], (slice(None), slice(0, n)))
    else:
        noisy = inputs[name] + torch.randn(inputs[name].shape, generator=g)
    base, moved = _run(model, inputs), _run(model, {**inputs, name: noisy})
    site, k0, layout = next((s, k0, lay) for (s, k0, lay), (_, k1, _) in zip(base, moved) if _changed(k0, k1))
    rows = _changed(k0, next(k1 for (s1, _, _), (_, k1, _) in zip(base, moved) if s1 == site))
    assert layout.image is not None and set(range(layout.image.start, layout.image.stop)) == rows, (
        f"{case} {site}: {layout.describe()}, latent-keyed rows {sorted(rows)}"
    )
    assert k0.shape[-2] > len(rows), f"{case}: the packed tokens are not in this call"
