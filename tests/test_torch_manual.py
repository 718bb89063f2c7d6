"""Hand-written attention in plain PyTorch models (`torch-manual` adapter).

The models are written here, one per common pattern: timm's ViT attention (`q @ kᵀ * scale`,
`Tensor.softmax`, dropout), nanoGPT's causal attention (`masked_fill` with a causal buffer, `F.softmax`),
lucidrains-style einsum attention with an `nn.Softmax` child, 3D `bmm` attention over (B·H, L, D) with a
`num_heads` attribute, and a module choosing `F.sdpa` or the manual path by a flag. For each: passive
observers leave the output bit-identical, the probs (and q/k/v/output) equal an independent reference
computed from the module's own weights, head edits equal a reference model whose value projection for
that head is zeroed, and detach leaves no shadowed forward or hook. Untraceable modules are listed with
a note and refused at attach.
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attntrace import Observer, Tracer
from attntrace.core.errors import AttachError, SelectionError
from attntrace.tracer import find_sites

DIM, HEADS, HEAD, SEQ = 32, 4, 1, 6
D = DIM // HEADS


# -- the models -----------------------------------------------------------------------------------
class TimmAttention(nn.Module):
    """timm's `vision_transformer.Attention` (fused_attn off)."""

    def __init__(self, dim: int = DIM, num_heads: int = HEADS) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = attn @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention, manual branch (causal mask from a buffer)."""

    causal = True

    def __init__(self, n_embd: int = DIM, n_head: int = HEADS, block_size: int = 16) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(0.0)
        self.n_head, self.n_embd = n_head, n_embd
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()  # nanoGPT's names
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class EinsumAttention(nn.Module):
    """lucidrains-style: einsum scores, an `nn.Softmax` module, einsum output."""

    def __init__(self, dim: int = DIM, heads: int = HEADS) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.attend = nn.Softmax(dim=-1)
        self.qkv = nn.Linear(dim, dim * 3)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        dots = torch.einsum("bhid,bhjd->bhij", q, k) * self.scale
        attn = self.attend(dots)
        out = torch.einsum("bhij,bhjd->bhid", attn, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, c))


class BmmAttention(nn.Module):
    """3D attention over (B·H, L, D): `torch.bmm` and `torch.softmax`."""

    def __init__(self, dim: int = DIM, num_heads: int = HEADS) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = getattr(self, "num_heads", HEADS)
        q, k, v = self.qkv(x).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4).reshape(3, b * h, n, c // h)
        attn = torch.bmm(q, k.transpose(1, 2)) * (c // h) ** -0.5
        attn = torch.softmax(attn, dim=-1)
        out = torch.bmm(attn, v).reshape(b, h, n, c // h)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class HeadlessBmmAttention(BmmAttention):
    """The same without a head-count attribute: a 3D score map that cannot be split into heads."""

    def __init__(self) -> None:
        super().__init__()
        del self.num_heads


class HeadlessMatmulAttention(HeadlessBmmAttention):
    """3D scores through `@` (not `bmm`) and no head count: only seen when the scores are computed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, D).permute(2, 0, 3, 1, 4).reshape(3, b * HEADS, n, D)
        attn = (q @ k.transpose(1, 2)).softmax(dim=-1)
        return self.proj((attn @ v).reshape(b, HEADS, n, D).transpose(1, 2).reshape(b, n, c))


class FlagAttention(TimmAttention):
    """F.sdpa or the manual path, chosen by `fused_attn`."""

    def __init__(self) -> None:
        super().__init__()
        self.fused_attn = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class LinearAttention(nn.Module):
    """Kernelised linear attention (elu+1 features): no softmax, no probability matrix."""

    def __init__(self, dim: int = DIM, heads: int = HEADS) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k = F.elu(q) + 1, F.elu(k) + 1
        kv = k.transpose(-2, -1) @ v
        z = 1 / (q @ k.sum(dim=-2, keepdim=True).transpose(-2, -1))
        return ((q @ kv) * z).transpose(1, 2).reshape(b, n, c)


class GatedAttention(nn.Module):
    """Named like attention, computes a sigmoid gate: nothing to trace."""

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.gate(x))


class Block(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM)
        self.attn = attn
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(x)


class Net(nn.Module):
    def __init__(self, attn_cls: type[nn.Module], depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, DIM)
        self.blocks = nn.ModuleList([Block(attn_cls()) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return x


PATTERNS = {
    "timm": TimmAttention,
    "nanogpt": CausalSelfAttention,
    "einsum": EinsumAttention,
    "bmm3d": BmmAttention,
    "flag_manual": FlagAttention,
    "flag_sdpa": FlagAttention,
}


def build(name: str, attn_cls: type[nn.Module] | None = None) -> tuple[Net, torch.Tensor]:
    torch.manual_seed(0)
    model = Net(attn_cls or PATTERNS[name]).eval()
    if name == "flag_sdpa":
        for block in model.blocks:
            block.attn.fused_attn = True
    return model, torch.randn(2, SEQ, 8)


# -- references (no tracer) -----------------------------------------------------------------------
def _qkv_linear(attn: nn.Module) -> nn.Linear:
    return attn.c_attn if hasattr(attn, "c_attn") else attn.qkv


@torch.no_grad()
def reference(attn: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """q, k, v (B, H, L, D), probs and output of one attention module on its input `x`, recomputed from
    its weights with einsum (a different formulation from every model above)."""
    lin = _qkv_linear(attn)
    b, n, _ = x.shape
    q, k, v = F.linear(x, lin.weight, lin.bias).view(b, n, 3, HEADS, D).unbind(2)
    q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(D)
    if getattr(attn, "causal", False):
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    probs = scores.softmax(-1)
    return {"query": q, "key": k, "value": v, "probs": probs, "output": torch.einsum("bhij,bhjd->bhid", probs, v)}


def attention_inputs(model: Net, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each block's attention input, captured by pre-hooks that are removed before returning."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        b.attn.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(f"blocks.{i}.attn", args[0]))
        for i, b in enumerate(model.blocks)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def zero_value_head(model: Net) -> Net:
    """A copy whose value projection for head HEAD is zero in every block (that head's output is 0)."""
    ref = copy.deepcopy(model)
    rows = slice(2 * DIM + HEAD * D, 2 * DIM + (HEAD + 1) * D)
    with torch.no_grad():
        for block in ref.blocks:
            lin = _qkv_linear(block.attn)
            lin.weight[rows] = 0
            lin.bias[rows] = 0
    return ref


# -- observers ------------------------------------------------------------------------------------
class Record(Observer):
    """Keeps a copy of each call's probs, q/k/v and output (grows per call; tiny models only)."""

    name = "record"
    needs = frozenset({"query", "key", "value", "probs", "output"})

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []

    def on_call(self, call) -> None:  # type: ignore[no-untyped-def]
        self.calls.append(
            {"site": call.site, "adapter": call.site_info.adapter, "heads": call.heads}
            | {n: getattr(call, n).detach().clone() for n in ("query", "key", "value", "probs", "output")}
        )


class ProbsOnly(Observer):
    name = "probs_only"
    needs = frozenset({"probs"})


class ZeroHeadProbs(Observer):
    """Editor: zeroes head HEAD's probabilities (so its output is 0). Keeps nothing."""

    name = "zero_head_probs"
    needs = frozenset({"probs"})
    edits = True

    def on_call(self, call) -> None:  # type: ignore[no-untyped-def]
        p = call.probs.clone()
        p[:, HEAD] = 0
        call.probs = p


def _assert_restored(model: nn.Module) -> None:
    for m in model.modules():
        assert "forward" not in vars(m), type(m).__name__
        assert not m._forward_hooks and not m._forward_pre_hooks, type(m).__name__


# -- the tests ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PATTERNS))
def test_sites_are_the_attention_modules(name: str) -> None:
    model, _ = build(name)
    sites = find_sites(model)
    assert [(s.name, s.adapter, s.heads) for s in sites] == [
        ("blocks.0.attn", "torch-manual", HEADS),
        ("blocks.1.attn", "torch-manual", HEADS),
    ]
    assert all(s.kind == "self" and s.traceable and not s.unavailable for s in sites)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_passive_trace_is_bit_identical_and_equals_reference(name: str) -> None:
    model, x = build(name)
    with torch.no_grad():
        plain = model(x)
    inputs = attention_inputs(model, x)
    tracer = Tracer()
    rec = tracer.add(Record())
    with tracer.attach(model), torch.no_grad():
        traced = model(x)
    _assert_restored(model)
    assert torch.equal(plain, traced)
    assert [c["site"] for c in rec.calls] == ["blocks.0.attn", "blocks.1.attn"]
    for c in rec.calls:
        expected = reference(model.get_submodule(c["site"]), inputs[c["site"]])
        assert c["heads"] == HEADS
        for key in ("probs", "value", "output", *(("query", "key") if name != "flag_sdpa" else ())):
            assert c[key].shape == expected[key].shape, (key, c[key].shape)
            assert torch.allclose(c[key].float(), expected[key], atol=1e-5), key
        if name == "flag_sdpa":  # F.sdpa: q/k are the kernel's own inputs
            assert torch.allclose(c["query"], expected["query"], atol=1e-6)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_head_edits_equal_zeroed_value_reference(name: str) -> None:
    model, x = build(name)
    with torch.no_grad():
        expected = zero_value_head(model)(x)
        plain = model(x)
    assert not torch.allclose(plain, expected, atol=1e-4)  # the edit matters
    for editor in ("ablate", ZeroHeadProbs()):
        tracer = Tracer()
        if editor == "ablate":
            tracer.add("ablate", match="blocks.*.attn", heads=[HEAD])
        else:
            tracer.add(editor, match="blocks.*.attn")
        with tracer.attach(model), torch.no_grad():
            got = model(x)
        _assert_restored(model)
        assert torch.allclose(got, expected, atol=1e-5), editor


def test_only_selected_sites_are_shadowed_and_detach_restores() -> None:
    model, x = build("timm")
    tracer = Tracer()
    tracer.add(ZeroHeadProbs(), match="blocks.1.attn")
    att = tracer.attach(model)
    assert "forward" in vars(model.blocks[1].attn) and "forward" not in vars(model.blocks[0].attn)
    assert att.traced_sites == ["blocks.1.attn"]
    att.detach()
    _assert_restored(model)
    with torch.no_grad():
        assert torch.equal(model(x), build("timm")[0](x))


def test_yaml_rules_through_the_python_api() -> None:
    model, x = build("nanogpt")
    inputs = attention_inputs(model, x)
    tracer = Tracer({"rules": [{"use": "stats", "match": "blocks.*.attn"}]})
    with tracer.attach(model), torch.no_grad():
        model(x)
    _assert_restored(model)
    rows = tracer.results()["stats"]
    assert {r["site"] for r in rows} == {"blocks.0.attn", "blocks.1.attn"}
    # The same rules as YAML text give the same table.
    text = Tracer("rules:\n  - use: stats\n    match: 'blocks.*.attn'\n")
    with text.attach(model), torch.no_grad():
        model(x)
    assert text.results()["stats"] == rows
    # Entropy rows equal the entropy of the reference probabilities (per batch item/head, or their mean).
    for site, inp in inputs.items():
        p = reference(model.get_submodule(site), inp)["probs"].double()
        ent = -(p * p.clamp_min(1e-300).log()).sum(-1).mean(-1)  # (B, H)
        checked = 0
        for r in rows:
            if r["site"] != site or r["metric"] != "entropy":
                continue
            e = ent if r["batch"] == "mean" else ent[r["batch"] : r["batch"] + 1]
            e = e.mean(0)
            e = e.mean() if r["head"] == "mean" else e[r["head"]]
            assert r["value"] == pytest.approx(float(e), abs=1e-5), r
            checked += 1
        assert checked


class CrossAttention(nn.Module):
    """DiT/SD-style cross-attention to a context of another length."""

    def __init__(self, dim: int = DIM, ctx_dim: int = 12, num_heads: int = HEADS) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q, self.to_kv, self.proj = nn.Linear(dim, dim), nn.Linear(ctx_dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.to_q(x).reshape(b, n, self.num_heads, -1).transpose(1, 2)
        k, v = self.to_kv(context).reshape(b, -1, 2, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (c // self.num_heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class CrossNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cross_attn = CrossAttention()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return x + self.cross_attn(x, context)


def test_cross_attention_probs_and_head_ablation() -> None:
    torch.manual_seed(0)
    model = CrossNet().eval()
    x, ctx = torch.randn(2, SEQ, DIM), torch.randn(2, 3, 12)
    (site,) = find_sites(model)
    assert (site.name, site.kind, site.adapter) == ("cross_attn", "cross", "torch-manual")
    m = model.cross_attn
    with torch.no_grad():
        plain = model(x, ctx)
        q = m.to_q(x).view(2, SEQ, HEADS, D).transpose(1, 2)
        k, v = m.to_kv(ctx).view(2, 3, 2, HEADS, D).permute(2, 0, 3, 1, 4)
        probs = torch.einsum("bhid,bhjd->bhij", q, k).div(math.sqrt(D)).softmax(-1)
        out = probs @ v
        out[:, HEAD] = 0
        expected = x + m.proj(out.transpose(1, 2).reshape(2, SEQ, DIM))
    tracer = Tracer()
    rec = tracer.add(Record())
    with tracer.attach(model), torch.no_grad():
        assert torch.equal(model(x, ctx), plain)
    (call,) = rec.calls
    assert call["probs"].shape == (2, HEADS, SEQ, 3)
    assert torch.allclose(call["probs"], probs, atol=1e-6) and torch.allclose(call["value"], v)
    tracer = Tracer()
    tracer.add("ablate", match="*", kind="cross", heads=[HEAD])
    with tracer.attach(model), torch.no_grad():
        assert torch.allclose(model(x, ctx), expected, atol=1e-6)
    _assert_restored(model)


# -- refusals -------------------------------------------------------------------------------------
def test_3d_scores_without_head_count_are_listed_and_refused() -> None:
    model, x = build("headless", HeadlessBmmAttention)
    sites = find_sites(model)
    assert [s.name for s in sites] == ["blocks.0.attn", "blocks.1.attn"]
    assert all(s.heads is None and "head count unknown" in s.note and "probs" in s.unavailable for s in sites)
    tracer = Tracer()
    tracer.add(ProbsOnly())
    with pytest.raises(SelectionError, match=r"\['probs'\].*cannot provide.*head count unknown"):
        tracer.attach(model)
    _assert_restored(model)
    # Observers that read nothing still run, and change nothing.
    tracer = Tracer()
    tracer.add("shapes")
    with torch.no_grad():
        plain = model(x)
        with tracer.attach(model):
            assert torch.equal(model(x), plain)
    _assert_restored(model)


def test_3d_scores_without_head_count_seen_only_at_run_time_are_refused_at_the_call() -> None:
    model, x = build("headless_matmul", HeadlessMatmulAttention)
    assert all(s.heads is None for s in find_sites(model))
    tracer = Tracer()
    tracer.add(ProbsOnly())
    # Not reported as one head of (B·H, Lq, Lk): refused when the scores are seen.
    error = pytest.raises(AttachError, match=r"3D \(B·H, Lq, Lk\).*head count is unknown")
    with error, tracer.attach(model), torch.no_grad():
        model(x)
    _assert_restored(model)


@pytest.mark.parametrize(
    ("attn_cls", "why", "kind"),
    [(LinearAttention, "no softmax over keys", "linear"), (GatedAttention, "no matrix product", "self")],
)
def test_model_with_no_traceable_attention_lists_why_and_refuses(
    attn_cls: type[nn.Module], why: str, kind: str
) -> None:
    model, x = build("untraceable", attn_cls)
    sites = find_sites(model)
    assert [(s.name, s.module_class, s.kind, s.traceable) for s in sites] == [
        ("blocks.0.attn", attn_cls.__name__, kind, False),
        ("blocks.1.attn", attn_cls.__name__, kind, False),
    ]
    assert all(why in s.note for s in sites)
    for observer in (ProbsOnly(), "shapes"):
        tracer = Tracer()
        tracer.add(observer)
        with pytest.raises(AttachError, match=attn_cls.__name__) as err:
            tracer.attach(model)
        assert why in str(err.value) and "blocks.0.attn" in str(err.value)
        _assert_restored(model)
        assert tracer.attachment is None


def test_class_without_source_code_is_found_from_its_bytecode() -> None:
    # A class defined in exec'd code or a REPL has no source for `inspect`: its bytecode is read instead.
    namespace: dict[str, Any] = {"nn": nn, "torch": torch, "DIM": DIM, "HEADS": HEADS, "__name__": "no_source"}
    code = inspect.getsource(TimmAttention).replace("TimmAttention", "ExecAttention")
    exec(compile(code.replace('"""timm\'s', '"""exec\'d'), "<no file>", "exec"), namespace)
    model, x = build("timm", namespace["ExecAttention"])
    assert [s.adapter for s in find_sites(model)] == ["torch-manual", "torch-manual"]
    reference_model, _ = build("timm")
    rec = Record()
    tracer = Tracer()
    tracer.add(rec)
    with torch.no_grad():
        with tracer.attach(model):
            out = model(x)
        assert torch.equal(out, reference_model(x))
    assert [c["site"] for c in rec.calls] == ["blocks.0.attn", "blocks.1.attn"]


def test_model_without_attention_at_all_is_a_clear_attach_error() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    assert find_sites(model) == []
    with pytest.raises(AttachError, match="no attention sites attntrace can trace"):
        Tracer().attach(model)
    _assert_restored(model)


def test_efficient_attention_softmax_over_features_is_not_reported() -> None:
    # softmax(q) over features and softmax(k) over positions (Shen et al.): no (Lq, Lk) matrix exists;
    # the site is found (softmax + products) but no call is reported as attention probabilities.
    class EfficientAttention(TimmAttention):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
            q, k = q.softmax(dim=-1), k.softmax(dim=-2)
            out = q @ (k.transpose(-2, -1) @ v)
            return self.proj(out.transpose(1, 2).reshape(b, n, c))

    model, x = build("efficient", EfficientAttention)
    tracer = Tracer()
    rec = tracer.add(Record())
    with torch.no_grad():
        plain = model(x)
        with tracer.attach(model):
            assert torch.equal(model(x), plain)
    assert rec.calls == []
    _assert_restored(model)
