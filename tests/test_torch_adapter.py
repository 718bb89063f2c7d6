"""Plain PyTorch adapter: modules calling F.sdpa, and nn.MultiheadAttention (fast and need_weights paths)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attntrace import Observer, Tracer
from attntrace.core.errors import AttachError


class Record(Observer):
    """Keeps every call's probs and output (grows with every call)."""

    name = "record"
    needs = frozenset({"probs", "output"})

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def on_call(self, call) -> None:  # type: ignore[no-untyped-def]
        self.calls.append((call.site, call.step, call.probs.clone(), call.output.clone(), call.value.clone()))


class Uniform(Observer):
    """Editor: replaces the probabilities by uniform attention (keeps nothing)."""

    name = "uniform"
    needs = frozenset({"probs"})
    edits = True

    def on_call(self, call) -> None:  # type: ignore[no-untyped-def]
        p = call.probs
        call.probs = torch.full_like(p, 1.0 / p.shape[-1])


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 4, 4)
        self.blocks = nn.Sequential(Block(), Block())

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.patch(img).flatten(2).transpose(1, 2))


def test_vit_block_sdpa() -> None:
    torch.manual_seed(0)
    model = TinyViT().eval()
    img = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        base = model(img)
    tracer = Tracer()
    assert [(s.name, s.adapter) for s in tracer.sites(model)] == [
        ("blocks.0.attn", "torch"),
        ("blocks.1.attn", "torch"),
    ]
    rec = tracer.add(Record(), match="blocks.*.attn")
    with torch.no_grad(), tracer.attach(model) as att:
        out = model(img)
        out2 = model(img)
        assert att.step == 1
    assert torch.equal(out, base) and torch.equal(out2, base)
    assert "forward" not in vars(model.blocks[0].attn)
    assert [(s, st) for s, st, *_ in rec.calls] == [("blocks.0.attn", 0), ("blocks.1.attn", 0),
                                                    ("blocks.0.attn", 1), ("blocks.1.attn", 1)]  # fmt: skip
    for _, _, probs, output, value in rec.calls:
        assert probs.shape == (2, 4, 16, 16)
        assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 16), atol=1e-6)
        assert (probs @ value - output).abs().max() < 1e-6


def test_vit_block_edit_and_restore() -> None:
    torch.manual_seed(0)
    model = TinyViT().eval()
    img = torch.randn(1, 3, 16, 16)
    attn = model.blocks[0].attn
    x = model.blocks[0].norm1(model.patch(img).flatten(2).transpose(1, 2))
    with torch.no_grad():
        b, n, c = x.shape
        v = attn.qkv(x).reshape(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)[2]
        expected = attn.proj(v.mean(-2, keepdim=True).expand(-1, -1, n, -1).transpose(1, 2).reshape(b, n, c))
    tracer = Tracer()
    tracer.add(Uniform(), match="blocks.0.attn")
    with torch.no_grad(), tracer.attach(model):
        got = attn(x)
    assert torch.allclose(got, expected, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(attn(x), expected, atol=1e-3)  # detached: back to real attention


def _mha(batch_first: bool, **kw) -> nn.MultiheadAttention:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return nn.MultiheadAttention(32, 4, batch_first=batch_first, **kw).eval()


def test_mha_fast_path_bit_identical() -> None:
    mha = _mha(True)
    x = torch.randn(2, 6, 32)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1, 4:] = True
    with torch.no_grad():
        base = mha(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
        _, ref_w = mha(x, x, x, key_padding_mask=kpm, need_weights=True, average_attn_weights=False)
    tracer = Tracer()
    assert [s.name for s in tracer.sites(mha)] == ["MultiheadAttention"]
    rec = tracer.add(Record())
    with torch.no_grad(), tracer.attach(mha):
        out = mha(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    assert torch.equal(out, base)
    probs, output, value = rec.calls[0][2:]
    assert (probs - ref_w).abs().max() <= 1e-6
    assert probs[1, :, :, 4:].abs().max() == 0
    assert (probs @ value - output).abs().max() <= 1e-6


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_need_weights_path(batch_first: bool) -> None:
    mha = _mha(batch_first, kdim=24, vdim=20)
    q = torch.randn(5, 2, 32)
    kv_k, kv_v = torch.randn(7, 2, 24), torch.randn(7, 2, 20)
    if batch_first:
        q, kv_k, kv_v = q.transpose(0, 1), kv_k.transpose(0, 1), kv_v.transpose(0, 1)
    causal = torch.ones(5, 7, dtype=torch.bool).triu(1)
    kw = {"attn_mask": causal, "need_weights": True, "average_attn_weights": False}
    base_out, base_w = mha(q, kv_k, kv_v, **kw)
    tracer = Tracer()
    rec = tracer.add(Record())
    with tracer.attach(mha):
        out, w = mha(q, kv_k, kv_v, **kw)
    assert torch.equal(out, base_out) and torch.equal(w, base_w)
    assert (rec.calls[0][2] - base_w).abs().max() <= 1e-6


def test_mha_edit_goes_through_out_proj() -> None:
    mha = _mha(True)
    x = torch.randn(2, 6, 32)
    tracer = Tracer()
    tracer.add(Uniform())
    with torch.no_grad(), tracer.attach(mha):
        out, w = mha(x, x, x, need_weights=True, average_attn_weights=True)
    wv = mha.in_proj_weight.chunk(3)[2]
    bv = mha.in_proj_bias.chunk(3)[2]
    v_mean = F.linear(x, wv, bv).mean(1, keepdim=True).expand(-1, 6, -1)
    expected = mha.out_proj(v_mean)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(w, torch.full((2, 6, 6), 1 / 6))


def test_mha_bias_k_refused() -> None:
    mha = _mha(True, add_bias_kv=True)
    tracer = Tracer()
    tracer.add(Record())
    with pytest.raises(AttachError, match="bias_k"):
        tracer.attach(mha)
    assert "forward" not in vars(mha)


def test_transformer_encoder_fast_path() -> None:
    """TransformerEncoderLayer in eval without grad never calls self_attn: still traced, bit-identical."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 32)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1, 3:] = True
    with torch.no_grad():
        base = enc(x, src_key_padding_mask=kpm)
    tracer = Tracer()
    assert [s.name for s in tracer.sites(enc)] == ["layers.0.self_attn", "layers.1.self_attn"]
    rec = tracer.add(Record())
    with torch.no_grad(), tracer.attach(enc):
        out = enc(x, src_key_padding_mask=kpm)
    assert torch.equal(out, base)
    assert [c[0] for c in rec.calls] == ["layers.0.self_attn", "layers.1.self_attn"]
    assert "forward" not in vars(enc.layers[0]) and "forward" not in vars(enc.layers[0].self_attn)
    first = enc.layers[0]
    with torch.no_grad():
        _, ref_w = first.self_attn(
            x, x, x, key_padding_mask=kpm, need_weights=True, average_attn_weights=False
        )
    assert (rec.calls[0][2] - ref_w).abs().max() <= 1e-6
    # With grad enabled the slow path calls self_attn: still exactly one call per layer.
    rec.calls.clear()
    with tracer.attach(enc):
        enc(x, src_key_padding_mask=kpm)
    assert len(rec.calls) == 2


def test_transformer_encoder_layer_edit() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 5, 32)
    mha = layer.self_attn
    with torch.no_grad():
        wv, bv = mha.in_proj_weight.chunk(3)[2], mha.in_proj_bias.chunk(3)[2]
        sa = mha.out_proj(F.linear(x, wv, bv).mean(1, keepdim=True).expand(-1, 5, -1))
        h = layer.norm1(x + sa)
        expected = layer.norm2(h + layer.linear2(F.relu(layer.linear1(h))))
    tracer = Tracer()
    tracer.add(Uniform())
    with torch.no_grad(), tracer.attach(layer):
        got = layer(x)
    assert torch.allclose(got, expected, atol=1e-5)


class HelperAttention(nn.Module):
    """F.sdpa in a helper method forward calls (as diffusers' `VidTokAttnBlock.attention` does)."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attention(x)


def test_sdpa_in_helper_method_is_a_site() -> None:
    # Regression: only `forward`'s own source was scanned, so attention in a helper method was invisible.
    from attntrace import find_sites

    torch.manual_seed(0)
    model = nn.Sequential(HelperAttention(), nn.Linear(16, 16)).eval()
    x = torch.randn(2, 5, 16)
    assert [(s.name, s.adapter) for s in find_sites(model)] == [("0", "torch")]
    with torch.no_grad():
        expected = model(x)
        tracer = Tracer()
        rec = tracer.add(Record())
        with tracer.attach(model):
            got = model(x)
    assert torch.equal(got, expected)
    assert len(rec.calls) == 1
    _, _, probs, out, v = rec.calls[0]
    torch.testing.assert_close(probs @ v, out, atol=1e-6, rtol=0)
    assert "forward" not in vars(model[0])  # restored


class FunctionalMHA(nn.Module):
    """Calls `F.multi_head_attention_forward` itself, with separate projections and a per-head float mask (as
    WavLM does with its gated relative position bias)."""

    def __init__(self, dim: int = 32, heads: int = 4, average: bool = False) -> None:
        super().__init__()
        self.heads, self.average = heads, average
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.randn(heads, 1, 1))

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        mask = (self.bias * torch.arange(n)[None, :, None].float()).repeat(b, 1, n)  # (B·H, L, L)
        xt = x.transpose(0, 1)
        return self._attend(xt, mask, padding)

    def _attend(self, xt: torch.Tensor, mask: torch.Tensor, padding: torch.Tensor | None) -> Any:
        bias = torch.cat((self.q_proj.bias, self.k_proj.bias, self.v_proj.bias))
        return F.multi_head_attention_forward(
            xt, xt, xt, xt.shape[-1], self.heads, torch.empty([0]), bias, None, None, False, 0.0,
            self.out_proj.weight, self.out_proj.bias, self.training, padding, need_weights=True, attn_mask=mask,
            use_separate_proj_weight=True, q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight,
            v_proj_weight=self.v_proj.weight, average_attn_weights=self.average,
        )  # fmt: skip


def test_functional_mha_in_a_helper_is_traced_bit_identical_probs_equal_its_weights() -> None:
    from attntrace import find_sites

    torch.manual_seed(0)
    module = FunctionalMHA().eval()
    x = torch.randn(2, 6, 32)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, -2:] = True
    assert [(s.name, s.adapter, s.processor_class) for s in find_sites(module)] == [
        ("FunctionalMHA", "torch", "F.multi_head_attention_forward")
    ]
    with torch.no_grad():
        base_out, base_w = module(x, padding)  # per-head weights: the oracle
    tracer = Tracer()
    rec = tracer.add(Record())
    with torch.no_grad(), tracer.attach(module):
        out, w = module(x, padding)
    assert torch.equal(out, base_out) and torch.equal(w, base_w)
    (_, _, probs, output, value), = rec.calls
    assert probs.shape == (2, 4, 6, 6) and float((probs - base_w).abs().max()) <= 1e-6
    assert float((probs @ value - output).abs().max()) <= 1e-5
    assert "forward" not in vars(module)


def test_functional_mha_edit_goes_through_out_proj() -> None:
    torch.manual_seed(0)
    module = FunctionalMHA(average=True).eval()
    x = torch.randn(2, 6, 32)
    tracer = Tracer()
    tracer.add(Uniform())
    with torch.no_grad(), tracer.attach(module):
        out, w = module(x)
    v_mean = module.v_proj(x).mean(1, keepdim=True).expand(-1, 6, -1)
    assert torch.allclose(out.transpose(0, 1), module.out_proj(v_mean), atol=1e-6)
    assert torch.allclose(w, torch.full((2, 6, 6), 1 / 6))
