"""`masactrl` equals MasaCtrl's mutual self-attention, written here from its definition, on real pipelines.

The reference is a diffusers attention processor installed on every attention module of the UNet. It
counts self-attention calls in call order within a forward (MasaCtrl's layer index) and forwards (its
step index), and in the chosen layers and steps lets each target image of each guidance half query the
source image's keys and values. Two numerics are checked: the diffusers kernel everywhere (the
reference differs from the untraced pipeline only in the edit: equality is expected), and MasaCtrl's
own (explicit softmax(q k^T * scale) v in every attention layer): equal to float round-off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attntrace import Tracer
from attntrace.core.errors import ConfigError, EditError
from attntrace.observers.masactrl import MasaCtrl, load_mask
from tests import sd_pipes

PROMPTS = ["a dog on grass", "a red dog sitting on grass"]
STEPS = 10


class MutualReference:
    """MasaCtrl from its definition, as one diffusers attention processor shared by every module."""

    def __init__(self, n_self: int, start_step: int, start_layer: int, explicit: bool,
                 masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:  # fmt: skip
        self.n_self, self.start_step, self.start_layer = n_self, start_step, start_layer
        self.explicit, self.masks = explicit, masks
        self.layer = self.step = 0

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        if not self.explicit:
            return F.scaled_dot_product_attention(q, k, v)
        return torch.einsum("...ij,...jd->...id", (torch.einsum("...id,...jd->...ij", q, k) * scale).softmax(-1), v)

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: Any = None, **_: Any) -> torch.Tensor:  # fmt: skip
        is_self = encoder_hidden_states is None
        context = hidden_states if is_self else encoder_hidden_states
        b, n, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        h = attn.heads
        q, k, v = (t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
        edit = False
        if is_self:
            edit = self.step >= self.start_step and self.layer >= self.start_layer
            self.layer += 1
            if self.layer == self.n_self:
                self.layer, self.step = 0, self.step + 1
        pairs = [(0, 1), (b // 2, b // 2 + 1)] if edit else []  # [uncond src, uncond tgt, cond src, cond tgt]
        if self.masks is None and pairs:
            k, v = k.clone(), v.clone()
            for src, tgt in pairs:
                k[tgt], v[tgt] = k[src], v[src]
        out = self.attend(q, k, v, attn.scale)
        if self.masks is not None:
            for src, tgt in pairs:
                out[tgt] = self.masked(q[tgt], k[src], v[src], attn.scale, n)
        out = out.transpose(1, 2).reshape(b, -1, h * out.shape[-1]).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))

    def masked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, n: int) -> torch.Tensor:
        assert self.masks is not None
        side = int(n**0.5)
        m_s, m_t = (F.interpolate(m[None, None], (side, side), mode="nearest").flatten() for m in self.masks)
        sim = torch.einsum("hid,hjd->hij", q, k) * scale
        lowest = torch.finfo(sim.dtype).min
        fg = torch.einsum("hij,hjd->hid", (sim + torch.where(m_s == 1, m_s, lowest)).softmax(-1), v)
        bg = torch.einsum("hij,hjd->hid", (sim + torch.where(m_s == 0, m_s, lowest)).softmax(-1), v)
        return fg * m_t[:, None] + bg * (1 - m_t[:, None])


def generate(pipe: Any, **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        return pipe(PROMPTS, latents=sd_pipes.latents(pipe, 2), num_inference_steps=STEPS, guidance_scale=7.5,
                    output_type="latent", **kw).images  # fmt: skip


_REFS: dict[tuple[int, str], torch.Tensor] = {}


def reference(pipe: Any, **kw: Any) -> torch.Tensor:
    key = (id(pipe), repr(sorted(kw.items(), key=lambda x: x[0])))
    if key not in _REFS:
        _REFS[key] = _reference(pipe, **kw)
    return _REFS[key]


def _reference(pipe: Any, **kw: Any) -> torch.Tensor:
    n_self = sum(1 for name, _ in pipe.unet.attn_processors.items() if name.endswith("attn1.processor"))
    saved = pipe.unet.attn_processors
    pipe.unet.set_attn_processor(MutualReference(n_self, **kw))
    try:
        return generate(pipe)
    finally:
        pipe.unet.set_attn_processor(saved)


def traced(pipe: Any, **params: Any) -> tuple[torch.Tensor, MasaCtrl]:
    tracer = Tracer()
    obs = tracer.add("masactrl", match="*", cfg=True, **params)
    with tracer.attach(pipe.unet):
        out = generate(pipe)
    return out, obs


@pytest.fixture(scope="module")
def sd15() -> Any:
    torch.set_num_threads(2)
    return sd_pipes.sd15()


@pytest.fixture(scope="module")
def plain(sd15: Any) -> torch.Tensor:
    return generate(sd15)


def test_sd15_equals_reference_with_masactrl_defaults(sd15: Any, plain: torch.Tensor) -> None:
    got, obs = traced(sd15)  # start_step 4, start_layer 10: MasaCtrl's SD defaults
    want = reference(sd15, start_step=4, start_layer=10, explicit=False)
    assert obs.result()["edited_calls"] == (STEPS - 4) * (16 - 10)
    assert torch.equal(got, want), (got - want).abs().max()
    # MasaCtrl's own numerics (explicit softmax in every layer): equal to float round-off.
    explicit = reference(sd15, start_step=4, start_layer=10, explicit=True)
    assert (got - explicit).abs().max() <= 1e-3
    # The edit is real on the target and leaves the source image exactly as generated without it.
    assert (got[1] - plain[1]).abs().max() > 2e-3  # random weights: a small but real change
    assert torch.equal(got[0], plain[0])


@pytest.mark.parametrize(("start_step", "start_layer"), [(7, 3)])
def test_sd15_start_step_and_layer(sd15: Any, start_step: int, start_layer: int) -> None:
    got, _ = traced(sd15, start_step=start_step, start_layer=start_layer)
    want = reference(sd15, start_step=start_step, start_layer=start_layer, explicit=False)
    assert torch.equal(got, want), (got - want).abs().max()


def test_kv_inject_is_not_masactrl(sd15: Any) -> None:
    # The older `kv_inject` edits every layer and both halves by one flag: not MasaCtrl's recipe.
    tracer = Tracer()
    tracer.add("kv_inject", match="*", kind="self", from_step=4, cfg=True)
    with tracer.attach(sd15.unet):
        got = generate(sd15)
    want = reference(sd15, start_step=4, start_layer=10, explicit=False)
    assert (got - want).abs().max() > 1e-3


def _masks() -> tuple[torch.Tensor, torch.Tensor]:
    src = torch.zeros(16, 16)
    src[4:12, 3:10] = 1
    tgt = torch.zeros(16, 16)
    tgt[5:14, 6:13] = 1
    return src, tgt


def test_sd15_mask_guided_equals_reference(sd15: Any, plain: torch.Tensor) -> None:
    masks = _masks()
    got, _ = traced(sd15, start_step=2, start_layer=4, mask_source=masks[0], mask_target=masks[1])
    want = reference(sd15, start_step=2, start_layer=4, explicit=False, masks=masks)
    diff = (got - want).abs().max()
    assert diff <= 1e-4, diff
    plain_kv, _ = traced(sd15, start_step=2, start_layer=4)
    assert (got[1] - plain_kv[1]).abs().max() > 1e-3  # the masks change the result
    assert torch.equal(got[0], plain[0])


def test_masks_from_files_and_rows(tmp_path: Path) -> None:
    from PIL import Image

    arr = np.zeros((8, 8), dtype=np.uint8)
    arr[2:5, 1:6] = 255
    Image.fromarray(arr).save(tmp_path / "m.png")
    want = torch.from_numpy(arr > 0).float()
    assert torch.equal(load_mask(str(tmp_path / "m.png")), want)
    obs = MasaCtrl(mask_source=want.tolist(), mask_target=str(tmp_path / "m.png"))
    assert obs._masks is not None and torch.equal(obs._masks[0], obs._masks[1])
    with pytest.raises(ConfigError, match="both mask_source and mask_target"):
        MasaCtrl(mask_source=want.tolist())
    with pytest.raises(ConfigError, match="does not exist"):
        MasaCtrl(mask_source="nope.png", mask_target="nope.png")


def test_bare_denoiser_needs_the_layout(sd15: Any) -> None:
    tracer = Tracer()
    tracer.add("masactrl", match="*", start_step=0, start_layer=0)
    unet = sd15.unet
    x = torch.randn(4, 4, 16, 16)
    with tracer.attach(unet), pytest.raises(EditError, match="batch layout is unknown"), torch.no_grad():
        unet(x, 10, encoder_hidden_states=torch.randn(4, 77, 32))


@pytest.fixture(scope="module")
def sdxl() -> Any:
    torch.set_num_threads(2)
    return sd_pipes.sdxl()


def test_sdxl_equals_reference(sdxl: Any) -> None:
    n_self = sum(1 for name in sdxl.unet.attn_processors if name.endswith("attn1.processor"))
    assert n_self == 22  # 2 + 4 down, 4 mid, 6 + 6 up transformer blocks
    got, obs = traced(sdxl, start_step=3, start_layer=8)
    want = reference(sdxl, start_step=3, start_layer=8, explicit=False)
    assert obs.result()["edited_calls"] == (STEPS - 3) * (n_self - 8)
    assert torch.equal(got, want), (got - want).abs().max()
    explicit = reference(sdxl, start_step=3, start_layer=8, explicit=True)
    assert (got - explicit).abs().max() <= 1e-3
