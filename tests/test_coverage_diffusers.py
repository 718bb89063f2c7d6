"""Coverage of diffusers model classes: transparency checks on a tiny instance of each class.

For every class in `tests.coverage_models.CASES` (plus variants): with passive observers reading
q/k/v, probs and output attached to every site any adapter claims (processor sites, and attention
computed outside processors through the plain-PyTorch adapter),
- the model output is bit-identical to the untraced output;
- every site whose module ran (forward hooks) got at least one kernel call, and no other site did;
- `probs @ value` equals the kernel output (fp32, 1e-5; a kernel run in bf16/fp16 to 4 eps of its
  dtype) and probs rows sum to 1 where not fully masked;
- after detach every site's processor (or instance-level forward) is the very same original object.
Linear-attention sites (Sana) have no kernel call: they are checked separately.

With `ATTNTRACE_SUPPORT_TABLE=path` set, the run writes a JSON record per class that
`tests/gen_support_table.py` turns into `docs/support_diffusers.md`.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import pytest
import torch

from attntrace import Observer, Tracer, find_sites
from attntrace.adapters.detect import weight_children
from attntrace.adapters.diffusers import DiffusersAdapter
from attntrace.core.call import AttentionCall
from attntrace.core.site import Site
from tests.coverage_models import (
    CASES,
    NO_ATTENTION,
    NOT_BUILT,
    OUTSIDE_PROCESSOR,
    VARIANTS,
    controlnet_text_embed,
    discover,
    run,
    unet1d,
    unet_text_embed,
)  # fmt: skip

_RECORDS: dict[str, dict[str, Any]] = {}


class Recorder(Observer):
    """Passive: reads q/k/v, probs and output; keeps per-site counts and the worst errors (O(sites))."""

    needs = frozenset({"query", "key", "value", "probs", "output"})

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}
        self.max_err = 0.0
        self.max_row_err = 0.0
        # Kernels run in low precision (SanaWM casts q/k/v to bfloat16 before F.sdpa): fp32 probs @ v is then
        # compared within a few units of that dtype's precision, and the worst ratio err / tolerance is kept.
        self.low_precision: dict[str, int] = {}
        self.max_low_ratio = 0.0
        self.layouts: dict[str, Any] = {}  # distinct call layouts by description (a handful per class)

    def on_call(self, call: AttentionCall) -> None:
        self.calls[call.site] = self.calls.get(call.site, 0) + 1
        self.layouts.setdefault(call.layout.describe(), call.layout)
        probs = call.probs
        out = call.output
        v = call.value
        if call.enable_gqa and v.shape[1] != probs.shape[1]:
            v = v.repeat_interleave(probs.shape[1] // v.shape[1], dim=1)
        ref = probs @ v.float()
        err = float((ref - out.float()).abs().max())
        if out.dtype in (torch.float32, torch.float64):
            self.max_err = max(self.max_err, err)
        else:
            name = str(out.dtype).removeprefix("torch.")
            self.low_precision[name] = self.low_precision.get(name, 0) + 1
            tol = 4 * torch.finfo(out.dtype).eps * max(1.0, float(out.float().abs().max()))
            self.max_low_ratio = max(self.max_low_ratio, err / tol)
        sums = probs.sum(-1)
        live = sums > 0  # fully masked rows may be all zero (or nan) depending on the kernel
        if bool(live.any()):
            self.max_row_err = max(self.max_row_err, float((sums[live] - 1).abs().max()))


class LinearRecorder(Observer):
    """Passive at linear sites: records which were reached (O(sites))."""

    needs = frozenset({"query", "key", "value", "output"})

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def on_call(self, call: AttentionCall) -> None:
        self.calls[call.site] = self.calls.get(call.site, 0) + 1
        assert call.output is not None


def _ran_modules(model: torch.nn.Module, names: list[str]) -> tuple[set[str], list[Any]]:
    ran: set[str] = set()
    handles = []
    modules = dict(model.named_modules())
    for name in names:
        handles.append(modules[name].register_forward_pre_hook(lambda m, a, n=name: ran.add(n)))
    return ran, handles


def _restore_token(site: Site) -> Any:
    # What attach replaces and detach must put back: the processor object (diffusers adapter) or the
    # module's instance-level `forward` (plain-PyTorch adapter; normally absent).
    if site.adapter == "diffusers":
        return site.module.processor
    return vars(site.module).get("forward")


def transparency(name: str, builder: Any) -> dict[str, Any]:
    """Run the checks on one class; returns the support record (asserts on failure).

    Every site any adapter claims is checked: processor sites (diffusers adapter) and attention computed
    outside processors (`F.sdpa` in a plain module, `nn.MultiheadAttention`: plain-PyTorch adapter).
    """
    model, inputs = builder()
    expected = run(model, inputs)
    sites = find_sites(model)
    assert sites, f"{name}: no attention sites found"
    assert {s.name for s in sites} >= {s.name for s in DiffusersAdapter().find_sites(model)}
    originals = {s.name: _restore_token(s) for s in sites}
    kinds = sorted({s.kind for s in sites})
    softmax_sites = [s.name for s in sites if s.kind != "linear"]
    linear_sites = [s.name for s in sites if s.kind == "linear"]
    outside = [s for s in sites if s.adapter != "diffusers"]
    # No double claim: a site outside processors neither is nor wraps a diffusers processor module, except a
    # child its forward uses only for its weights (never called: SD3's IPAdapterTimeImageProjectionBlock.attn).
    for s in outside:
        containers = set(weight_children(s.module)) if s.adapter == "torch-manual" else set()
        wrapped = [
            n for n, m in s.module.named_modules() if getattr(m, "processor", None) is not None and n not in containers
        ]
        assert not wrapped, f"{name}: {s.adapter} site {s.name} wraps processor module(s) {wrapped[:3]}"

    tracer = Tracer()
    rec = tracer.add(Recorder(), kind=["self", "cross", "joint"]) if softmax_sites else None
    lin = tracer.add(LinearRecorder(), kind="linear") if linear_sites else None
    ran, handles = _ran_modules(model, [s.name for s in sites])
    try:
        with tracer.attach(model):
            got = run(model, inputs)
    finally:
        for h in handles:
            h.remove()

    assert torch.equal(got, expected), f"{name}: traced output differs from the untraced one"
    for s in sites:
        assert _restore_token(s) is originals[s.name], f"{name}: {s.name} not restored"
    notes = []
    for adapter in sorted({s.adapter for s in outside}):
        mine = [s for s in outside if s.adapter == adapter]
        classes = ", ".join(sorted({type(s.module).__name__ for s in mine}))
        how = "plain-PyTorch adapter" if adapter == "torch" else f"{adapter} adapter"
        notes.append(f"{len(mine)} site(s) outside processors ({classes}): {how}")
    if rec is not None:
        seen = set(rec.calls)
        ran_softmax = ran & set(softmax_sites)
        assert seen == ran_softmax, (
            f"{name}: sites ran but unseen {sorted(ran_softmax - seen)[:5]}, "
            f"seen but not run {sorted(seen - ran_softmax)[:5]}"
        )
        assert rec.max_err < 1e-5, f"{name}: probs @ value differs from the kernel output by {rec.max_err}"
        assert rec.max_row_err < 1e-5, f"{name}: probs rows do not sum to 1 ({rec.max_row_err})"
        assert rec.max_low_ratio < 1, f"{name}: low-precision kernel output off by {rec.max_low_ratio} tolerances"
        for dtype, n in sorted(rec.low_precision.items()):
            notes.append(f"{n} kernel call(s) in {dtype} (probs@v checked to 4 eps of {dtype})")
        if ran_softmax != set(softmax_sites):
            notes.append(f"{len(set(softmax_sites) - ran_softmax)} site(s) not run by this forward")
    layouts = list(rec.layouts.values()) if rec is not None else []
    linear_seen = set(lin.calls) if lin is not None else set()
    if linear_sites:
        notes.append(
            f"linear attention at {len(linear_sites)} site(s): no probs; "
            + ("q/k/v/output observed" if linear_seen else "q/k/v/output not observable")
        )
    partial = "partial (not at linear sites)"
    support = "yes" if not linear_sites else ("no" if not softmax_sites else partial)
    processors = sorted({s.processor_class for s in sites})
    adapters = sorted({s.adapter for s in sites})
    return {
        "class": name, "adapter": ", ".join(adapters), "kinds": kinds, "sites": len(sites),
        "probs": support, "editing": support,
        "processors": processors, "max_err": rec.max_err if rec else None, "notes": "; ".join(notes),
        "layout": layout_summary(layouts),
    }  # fmt: skip


def layout_summary(layouts: list[Any]) -> str:
    """One cell: per kind, the text ranges (and order for joint attention) and image grids the calls had."""
    parts = []
    for kind in ("cross", "joint", "self", "linear"):
        mine = [lay for lay in layouts if lay.kind == kind]
        if not mine:
            continue
        unknown = sorted({lay.note for lay in mine if not lay.known})
        known = [lay for lay in mine if lay.known]
        texts = sorted({f"{lay.text.start}:{lay.text.stop}" for lay in known if lay.text is not None})
        grids = sorted({"x".join(map(str, lay.grid)) for lay in known if lay.grid is not None})
        cell = kind
        if kind == "joint":
            firsts = {lay.text.start < lay.image.start for lay in known if lay.text is not None and lay.image}
            cell += " (" + "/".join("text first" if f else "image first" for f in sorted(firsts, reverse=True)) + ")"
        if texts:
            cell += " text " + " ".join(texts)
        if grids:
            cell += " grid " + " ".join(grids)
        if unknown:
            cell += " unknown: " + "; ".join(unknown)
        parts.append(cell.replace(" ()", ""))
    return "; ".join(parts)


_ALL = {**CASES, **VARIANTS}


@pytest.mark.parametrize("name", list(_ALL))
def test_transparency(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        record = transparency(name, _ALL[name])
    _RECORDS[name] = record


@pytest.mark.parametrize("name", list(NO_ATTENTION()))
def test_no_attention(name: str) -> None:
    """Classes whose default config does not build hold no attention at all (built tiny here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = NO_ATTENTION()[name]()
    assert type(model).__name__ == name
    assert find_sites(model) == []
    assert not any(getattr(m, "processor", None) is not None for m in model.modules())


def test_discovery_lists_unbuilt_classes() -> None:
    """Every ModelMixin subclass with attention is either in CASES or reported as not built."""
    found = discover()
    with_attention = {n for n, v in found.items() if not isinstance(v, int) or v > 0}
    assert set(CASES) <= set(found), sorted(set(CASES) - set(found))
    assert set(NOT_BUILT) <= with_attention, sorted(set(NOT_BUILT) - with_attention)
    assert not set(NOT_BUILT) & set(CASES)
    assert set(OUTSIDE_PROCESSOR) <= set(CASES), sorted(set(OUTSIDE_PROCESSOR) - set(CASES))
    unbuilt = sorted(with_attention - set(CASES))
    _RECORDS["__discovery__"] = {"found": found, "unbuilt": unbuilt}
    # The known attention-bearing families are all discovered.
    for cls in ("UNet2DConditionModel", "UNet2DModel", "VQModel", "SanaTransformer2DModel", "AutoencoderKL"):
        assert isinstance(found[cls], int) and found[cls] > 0, cls


@pytest.fixture(scope="module", autouse=True)
def _write_records() -> Any:
    yield
    path = os.environ.get("ATTNTRACE_SUPPORT_TABLE")
    if path and _RECORDS:
        with open(path, "w") as fh:
            json.dump(_RECORDS, fh, indent=1, default=str)


class ProbsKeeper(Observer):
    """Passive: keeps each call's probs, per site (a handful of tiny maps)."""

    needs = frozenset({"probs"})

    def __init__(self) -> None:
        super().__init__()
        self.probs: dict[str, list[torch.Tensor]] = {}

    def on_call(self, call: AttentionCall) -> None:
        self.probs.setdefault(call.site, []).append(call.probs.clone())


def _inputs_of(model: torch.nn.Module, cls_name: str) -> tuple[dict[str, list[tuple[Any, ...]]], list[Any]]:
    seen: dict[str, list[tuple[Any, ...]]] = {}
    handles = [
        m.register_forward_pre_hook(
            lambda m, a, n=n: seen.setdefault(n, []).append(tuple(t.detach().clone() for t in a))
        )
        for n, m in model.named_modules()
        if type(m).__name__ == cls_name
    ]
    return seen, handles


def _self_attention_1d_probs(m: Any, x: torch.Tensor) -> torch.Tensor:
    # diffusers SelfAttention1d: GroupNorm over channels, per-head q·kᵀ / sqrt(d), softmax over keys.
    h = m.group_norm(x).transpose(1, 2)
    b, length, c = h.shape
    q = m.query(h).view(b, length, m.num_heads, -1).transpose(1, 2)
    k = m.key(h).view(b, length, m.num_heads, -1).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)


def _ip_block_probs(m: Any, x: torch.Tensor, latents: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    # SD3 IPAdapterTimeImageProjectionBlock: AdaLN-modulated latents attend over [image features, latents]
    # with the projections of its `attn` child; scale 1/sqrt(d) split over q and k.
    shift, scale = m.adaln_proj(m.adaln_silu(temb)).chunk(4, dim=1)[:2]
    lat = m.ln1(latents) * (1 + scale[:, None]) + shift[:, None]
    b, heads = lat.shape[0], m.attn.heads
    q = m.attn.to_q(lat).view(b, -1, heads, m.attn.to_q.out_features // heads).transpose(1, 2)
    k = m.attn.to_kv(torch.cat((m.ln0(x), lat), dim=-2)).chunk(2, dim=-1)[0]
    k = k.view(b, -1, heads, q.shape[-1]).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)


def _attention_pooling_probs(m: Any, x: torch.Tensor) -> torch.Tensor:
    # diffusers AttentionPooling: a mean "class token" (plus positional embedding) attends over itself and x.
    b, length, width = x.shape
    cls = x.mean(dim=1, keepdim=True) + m.positional_embedding
    kv = torch.cat([cls, x], dim=1)
    q = m.q_proj(cls).view(b, 1, m.num_heads, -1).transpose(1, 2)
    k = m.k_proj(kv).view(b, length + 1, m.num_heads, -1).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)


@pytest.mark.parametrize(
    ("builder", "cls_name", "reference"),
    [
        (unet1d, "SelfAttention1d", _self_attention_1d_probs),
        (unet_text_embed, "AttentionPooling", _attention_pooling_probs),
        (controlnet_text_embed, "AttentionPooling", _attention_pooling_probs),
        (VARIANTS["SD3Transformer2DModel[ip_adapter]"], "IPAdapterTimeImageProjectionBlock", _ip_block_probs),
    ],
)
def test_hand_written_probs_match_reference(builder: Any, cls_name: str, reference: Any) -> None:
    """Probs at diffusers' hand-written attention (torch-manual adapter) equal a recomputation from the
    module's own weights and inputs, call for call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model, inputs = builder()
        tracer = Tracer()
        keeper = tracer.add(ProbsKeeper(), match="*")
        seen, handles = _inputs_of(model, cls_name)
        try:
            with tracer.attach(model):
                run(model, inputs)
        finally:
            for h in handles:
                h.remove()
    modules = dict(model.named_modules())
    assert seen and set(seen) <= set(keeper.probs), sorted(set(seen) - set(keeper.probs))
    for name, xs in seen.items():
        assert len(keeper.probs[name]) == len(xs)
        with torch.no_grad():
            for got, args in zip(keeper.probs[name], xs, strict=True):
                ref = reference(modules[name], *args)
                assert got.shape == ref.shape, (name, got.shape, ref.shape)
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_kandinsky3_self_attention_kind() -> None:
    """Kandinsky3's self-attention blocks build `Attention(c, c)` (is_cross_attention=True): their sites
    are labelled `self` exactly where the model calls them with the query's own tensor as context."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model, inputs = CASES["Kandinsky3UNet"]()
    sites = {s.name: s for s in find_sites(model) if s.adapter == "diffusers"}
    same: dict[str, bool] = {}

    def hook(name: str) -> Any:
        def pre(m: torch.nn.Module, a: tuple[Any, ...], kw: dict[str, Any]) -> None:
            context = a[1] if len(a) > 1 else kw.get("encoder_hidden_states")
            same.setdefault(name, context is a[0])

        return pre

    handles = [s.module.register_forward_pre_hook(hook(name), with_kwargs=True) for name, s in sites.items()]
    try:
        run(model, inputs)
    finally:
        for h in handles:
            h.remove()
    assert same and set(same.values()) == {True, False}, same
    for name, self_call in same.items():
        assert sites[name].kind == ("self" if self_call else "cross"), (name, sites[name].kind)


class UniformProbs(Observer):
    """Editor: every query attends uniformly to all keys. Keeps nothing."""

    needs = frozenset({"probs"})
    edits = True

    def on_call(self, call: AttentionCall) -> None:
        p = call.probs
        call.probs = torch.full_like(p, 1.0 / p.shape[-1])


def _ltx2_uniform(m: Any, x: torch.Tensor) -> torch.Tensor:
    # Uniform attention: every position gets the mean of v over positions.
    v = m.v(m.norm(x))
    return x + m.proj_out(v.mean(dim=(2, 3), keepdim=True).expand_as(v))


def _pooling_uniform(m: Any, x: torch.Tensor) -> torch.Tensor:
    # Uniform attention of the class token over [class token, x]: v_proj is affine, so mean(v) = v_proj(mean).
    kv = torch.cat([x.mean(dim=1, keepdim=True) + m.positional_embedding, x], dim=1)
    return m.v_proj(kv.mean(dim=1))


@pytest.mark.parametrize(
    ("builder", "cls_name", "reference"),
    [
        (CASES["AutoencoderKLLTX2Audio"], "LTX2AudioAttnBlock", _ltx2_uniform),  # bmm(v, probsᵀ)
        (unet_text_embed, "AttentionPooling", _pooling_uniform),  # einsum over 3D (B·H, Lq, Lk) probs
    ],
)
def test_hand_written_probs_edit_equals_reference(builder: Any, cls_name: str, reference: Any) -> None:
    """Editing probs at diffusers' hand-written attention rebuilds the module output from the edited map."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model, inputs = builder()
        io: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        handles = [
            m.register_forward_hook(lambda m, a, o, n=n: io.setdefault(n, []).append((a[0].clone(), o.clone())))
            for n, m in model.named_modules()
            if type(m).__name__ == cls_name
        ]
        tracer = Tracer()
        tracer.add(UniformProbs(), match="*")
        try:
            with tracer.attach(model):
                run(model, inputs)
        finally:
            for h in handles:
                h.remove()
    modules = dict(model.named_modules())
    assert io
    with torch.no_grad():
        for name, pairs in io.items():
            for x, out in pairs:
                torch.testing.assert_close(out, reference(modules[name], x), rtol=1e-5, atol=1e-5)
