"""Plain PyTorch adapter: `nn.MultiheadAttention`, and modules that call `F.scaled_dot_product_attention`.

Sites are every `nn.MultiheadAttention` and every module whose class's `forward` source calls
`scaled_dot_product_attention` itself or through a helper method of the class (checked once per
class); a module is not a site when one of its descendants is (the innermost module that computes
attention is the site). Modules another adapter
claimed first (diffusers processors, transformers attention modules) stay theirs.

SDPA modules: `forward` is shadowed by an instance attribute that runs the original forward under the
site's `KernelInterceptor`, which catches each `F.sdpa` call. `nn.MultiheadAttention`: its kernel is
fused (fast path) or hand-written (`need_weights`), so the call is rebuilt from the module's own
projection weights; the module's own forward produces the result unless an observer edits, and then
the output goes through `out_proj` as the module would.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..core.call import AttentionCall
from ..core.errors import AttachError, AttnTraceError
from ..core.layout import Layout
from ..core.site import Site
from ..tracing.binding import LayerCall, SiteBinding
from ..tracing.intercept import KernelInterceptor
from ..tracing.run import KernelCall, run_call
from .base import Adapter, Undo
from .detect import calls_functional_mha, head_count, is_sdpa_module

__all__ = ["TorchAdapter"]


@dataclass(eq=False)
class _MHAState:
    """Per-site state of a traced `nn.MultiheadAttention`: a result the encoder-layer path hands down."""

    # None: dispatch as usual; "skip": run the module untouched (already dispatched); a tuple: return it.
    override: Any = None


class TorchAdapter(Adapter):
    """Traces plain PyTorch attention: `nn.MultiheadAttention` and modules calling `F.sdpa`."""

    name = "torch"

    def applies_to(self, model: torch.nn.Module) -> bool:
        return isinstance(model, torch.nn.Module)

    def find_sites(self, model: torch.nn.Module) -> list[Site]:
        candidates = [(n, m) for n, m in model.named_modules() if is_sdpa_module(m)]
        names = [n for n, _ in candidates]
        sites = []
        for name, module in candidates:
            prefix = f"{name}." if name else ""
            if any(other != name and other.startswith(prefix) for other in names):
                continue  # an inner module computes the attention
            mha = isinstance(module, torch.nn.MultiheadAttention)
            note = ""
            if mha and (module.bias_k is not None or module.add_zero_attn):
                note = "bias_k/bias_v and add_zero_attn are not supported"
            sites.append(
                Site(
                    name=name or type(module).__name__,
                    kind="self",
                    module=module,
                    adapter=self.name,
                    processor_class="MultiheadAttention" if mha else (
                        "F.multi_head_attention_forward" if calls_functional_mha(type(module))
                        else "F.scaled_dot_product_attention"
                    ),
                    heads=head_count(module),
                    # probs stays True: `install` refuses with the real reason, not as "linear attention".
                    note=note,
                )
            )
        return sites

    def install(self, binding: SiteBinding) -> Undo:
        module = binding.site.module
        if "forward" in vars(module):
            raise AttachError(
                f"site {binding.site.name!r} already has an instance-level forward (another tracer or a "
                "patch); detach or remove it first"
            )
        if isinstance(module, torch.nn.MultiheadAttention):
            if module.bias_k is not None or module.add_zero_attn:
                raise AttachError(
                    f"site {binding.site.name!r}: nn.MultiheadAttention with bias_k/bias_v or add_zero_attn "
                    "is not supported by attntrace"
                )
            state = _MHAState()
            forward = _mha_forward(binding, module, state)
            undo_layer = _patch_encoder_layer(binding, module, state)
        elif calls_functional_mha(type(module)):
            undo_layer = None
            forward = _functional_forward(binding, module.forward)
        else:
            undo_layer = None
            forward = KernelInterceptor(binding).forward_for(module.forward)
        module.forward = forward  # an instance attribute shadows the class's forward

        def undo() -> None:
            if undo_layer is not None:
                undo_layer()
            if vars(module).get("forward") is forward:
                del module.forward

        return undo


def _patch_encoder_layer(binding: SiteBinding, mha: torch.nn.MultiheadAttention, state: _MHAState) -> Undo | None:
    name = binding.site.name
    if not name.endswith("self_attn"):
        return None
    parent_name = name.rpartition(".")[0]
    try:
        parent = binding.attachment.model.get_submodule(parent_name)
    except AttributeError:
        return None
    if not isinstance(parent, torch.nn.TransformerEncoderLayer) or parent.self_attn is not mha:
        return None
    if "forward" in vars(parent):
        raise AttachError(f"module {parent_name!r} already has an instance-level forward; remove it first")
    forward = _encoder_layer_forward(binding, parent, state)
    parent.forward = forward

    def undo() -> None:
        if vars(parent).get("forward") is forward:
            del parent.forward

    return undo


def _bind_mha(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Any, ...]:
    return query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class _SlowPath(TorchFunctionMode):
    """A pass-through mode: any active mode turns off `TransformerEncoderLayer`'s fused fast path."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        return func(*args, **(kwargs or {}))


@dataclass
class _Projections:
    """What `F.multi_head_attention_forward` computes attention from: inputs (L, B, E) and the weights."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    heads: int
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    biases: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]
    out_weight: torch.Tensor
    out_bias: torch.Tensor | None
    key_padding_mask: torch.Tensor | None
    attn_mask: torch.Tensor | None
    need_weights: bool
    average: bool


def _rebuild(
    binding: SiteBinding, layer: LayerCall, p: _Projections
) -> tuple[AttentionCall, Callable[[], tuple[torch.Tensor, torch.Tensor | None]]]:
    """Rebuild a multi-head attention call from its projections and dispatch it; `finish()` gives the edited
    result as `F.multi_head_attention_forward` returns it ((L, B, E) output, through the output projection)."""
    query, key = p.query, p.key
    lq, b, e = query.shape
    lk = key.shape[0]
    h = p.heads
    (wq, wk, wv), (bq, bk, bv) = p.weights, p.biases

    def heads(x: torch.Tensor, length: int) -> torch.Tensor:
        return x.reshape(length, b, h, -1).permute(1, 2, 0, 3)

    q = heads(F.linear(query, wq, bq), lq)
    k = heads(F.linear(key, wk, bk), lk)
    v = heads(F.linear(p.value, wv, bv), lk)
    mask = None
    if p.attn_mask is not None:
        m = _additive(p.attn_mask, q.dtype)
        mask = m[None, None] if m.dim() == 2 else m.reshape(b, h, lq, lk)
    if p.key_padding_mask is not None:
        m = _additive(p.key_padding_mask, q.dtype)[:, None, None, :]
        mask = m if mask is None else mask + m

    def kernel_fn(
        q2: torch.Tensor, k2: torch.Tensor, v2: torch.Tensor, m2: torch.Tensor | None
    ) -> torch.Tensor:
        return F.scaled_dot_product_attention(q2, k2, v2, attn_mask=m2)

    call = run_call(binding, layer, KernelCall(
        query=q, key=k, value=v, attn_mask=mask, scale=None, is_causal=False, enable_gqa=False,
        kernel_fn=kernel_fn, layout=Layout("self", image=slice(0, lq)),
    ), result=False).call  # fmt: skip

    def finish() -> tuple[torch.Tensor, torch.Tensor | None]:
        out = call.output.permute(2, 0, 1, 3).reshape(lq, b, e).to(query.dtype)
        out = F.linear(out, p.out_weight, p.out_bias)
        weights = None
        if p.need_weights:
            weights = call.probs.to(query.dtype)
            if p.average:
                weights = weights.mean(dim=1)
        return out, weights

    return call, finish


def _mha_call(
    binding: SiteBinding,
    layer: LayerCall,
    mha: torch.nn.MultiheadAttention,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[AttentionCall, Callable[[], tuple[torch.Tensor, torch.Tensor | None]]]:
    """Rebuild the call of `mha(*args, **kwargs)` from its weights and dispatch it; `finish()` gives the
    edited result (through `out_proj`, as the module would)."""
    query, key, value, kpm, need_weights, attn_mask, average = _bind_mha(*args, **kwargs)
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        kpm = None if kpm is None else kpm.unsqueeze(0)
    elif mha.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    # (L, B, E) from here on, as in F.multi_head_attention_forward.
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    biases = (None, None, None) if mha.in_proj_bias is None else tuple(mha.in_proj_bias.chunk(3))
    call, finish_lbe = _rebuild(binding, layer, _Projections(
        query, key, value, mha.num_heads, (wq, wk, wv), biases, mha.out_proj.weight,  # type: ignore[arg-type]
        mha.out_proj.bias, kpm, attn_mask, need_weights, average,
    ))  # fmt: skip

    def finish() -> tuple[torch.Tensor, torch.Tensor | None]:
        out, weights = finish_lbe()
        if unbatched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        elif mha.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    return call, finish


# Bound on every traced call: read once.
_FUNCTIONAL_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def _functional_call(
    binding: SiteBinding, layer: LayerCall, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[AttentionCall, Callable[[], tuple[torch.Tensor, torch.Tensor | None]]]:
    """Rebuild a call of `F.multi_head_attention_forward(*args, **kwargs)` (batched inputs) and dispatch it."""
    a = _FUNCTIONAL_SIGNATURE.bind(*args, **kwargs)
    a.apply_defaults()
    f = a.arguments
    site = binding.site.name
    if f["query"].dim() != 3:
        raise AttnTraceError(f"site {site!r}: F.multi_head_attention_forward with unbatched inputs is not traced")
    unsupported = [n for n in ("bias_k", "bias_v", "static_k", "static_v") if f[n] is not None]
    if f["add_zero_attn"]:
        unsupported.append("add_zero_attn")
    if f["is_causal"] and f["attn_mask"] is None:
        unsupported.append("is_causal without attn_mask")
    if unsupported:
        raise AttnTraceError(
            f"site {site!r}: F.multi_head_attention_forward with {', '.join(unsupported)} is not supported by attntrace"
        )
    if f["use_separate_proj_weight"]:
        weights = (f["q_proj_weight"], f["k_proj_weight"], f["v_proj_weight"])
    else:
        weights = tuple(f["in_proj_weight"].chunk(3))
    bias = f["in_proj_bias"]
    biases = (None, None, None) if bias is None else tuple(bias.chunk(3))
    return _rebuild(binding, layer, _Projections(
        f["query"], f["key"], f["value"], int(f["num_heads"]), weights, biases, f["out_proj_weight"],  # type: ignore[arg-type]
        f["out_proj_bias"], f["key_padding_mask"], f["attn_mask"], bool(f["need_weights"]),
        bool(f["average_attn_weights"]),
    ))  # fmt: skip


class _FunctionalMHA(TorchFunctionMode):
    """Active while a module that calls `F.multi_head_attention_forward` runs: each call is dispatched (its
    inner ops run inside torch, out of any mode's sight); untouched, the function itself gives the result."""

    def __init__(self, binding: SiteBinding, layer: LayerCall) -> None:
        super().__init__()
        self.binding, self.layer = binding, layer

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is not F.multi_head_attention_forward:
            return func(*args, **kwargs)
        call, finish = _functional_call(self.binding, self.layer, args, kwargs)
        return func(*args, **kwargs) if not call.edited else finish()


def _functional_forward(binding: SiteBinding, original: Callable[..., Any]) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        layer = binding.enter()
        if layer is None:
            return original(*args, **kwargs)
        with _FunctionalMHA(binding, layer):
            return original(*args, **kwargs)

    return forward


def _mha_forward(binding: SiteBinding, mha: torch.nn.MultiheadAttention, state: _MHAState) -> Any:
    original = mha.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        override = state.override
        if override is not None:
            state.override = None
            return original(*args, **kwargs) if override == "skip" else override
        layer = binding.enter()
        if layer is None:
            return original(*args, **kwargs)
        call, finish = _mha_call(binding, layer, mha, args, kwargs)
        # Untouched: the module's own forward (fast path or not) gives the result, bit for bit.
        return original(*args, **kwargs) if not call.edited else finish()

    return forward


def _encoder_layer_forward(
    binding: SiteBinding, encoder: torch.nn.TransformerEncoderLayer, state: _MHAState
) -> Any:
    """`TransformerEncoderLayer` in eval without grad runs one fused op and never calls its `self_attn`."""
    original = encoder.forward
    mha = encoder.self_attn

    def forward(
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        layer = binding.enter()
        if layer is None:
            return original(src, src_mask, src_key_padding_mask, is_causal=is_causal)
        x = encoder.norm1(src) if encoder.norm_first else src
        kw = {"attn_mask": src_mask, "key_padding_mask": src_key_padding_mask, "need_weights": False}
        call, finish = _mha_call(binding, layer, mha, (x, x, x), kw)
        if not call.edited:
            state.override = "skip"  # the slow path must not dispatch this call a second time
            try:
                return original(src, src_mask, src_key_padding_mask, is_causal=is_causal)
            finally:
                state.override = None
        state.override = finish()
        try:
            with _SlowPath():  # the edited attention result must go through `self_attn`
                return original(src, src_mask, src_key_padding_mask, is_causal=is_causal)
        finally:
            state.override = None

    return forward
