"""HF transformers adapter (5.x): a wrapper registered in the attention-function registry.

transformers 5.x attention modules call `ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation,
eager_attention_forward)` on every forward, with (B, H, L, D) tensors and the module as first argument.
`prepare` registers one wrapper per original implementation (`sdpa`, `eager`) under a unique name, and
the matching mask function under the same name (without it transformers builds no mask at all and
padding is silently ignored), then points every config of the model at the wrapper. The wrapper calls
the original implementation; at bound modules it builds an `AttentionCall` first. Detach restores every
config's own `_attn_implementation` and removes both registry entries.

transformers is imported lazily, so attntrace imports without it.
"""

from __future__ import annotations

import inspect
import itertools
import re
import sys
from collections.abc import Callable
from typing import Any

import torch

from ..core.call import AttentionCall
from ..core.errors import AttachError
from ..core.layout import token_layout
from ..core.site import Site
from ..tracing.binding import LayerCall, SiteBinding
from ..tracing.run import KernelCall, run_call
from .base import Adapter, Undo
from .detect import calls_registry, getsource, head_count, is_transformers_model, kind_by_name, token_modality

__all__ = ["TransformersAdapter"]

_SUPPORTED = ("sdpa", "eager")
_counter = itertools.count()


class RegistryName(str):
    """The name a traced config's `_attn_implementation` holds while attached.

    As a string it is the wrapper's unique registry key (`attntrace_<n>_sdpa`): registry lookups hash it
    and find the wrapper. Compared with `==`/`in`, it also equals the implementation it wraps, because
    models branch on the name (`if config._attn_implementation == "sdpa"`: GLM-5-Next's sparse mask dtype,
    DeepSeek-V3.2's indexer mask, Gemma 4's logits slicing): with a plain unique name they took another
    path than untraced, and outputs differed."""

    wraps: str

    def __new__(cls, value: str, wraps: str) -> RegistryName:
        obj = super().__new__(cls, value)
        obj.wraps = wraps
        return obj

    def __getnewargs__(self) -> tuple[str, str]:  # type: ignore[override]  # copy/pickle keep `wraps`
        return (str(self), self.wraps)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, str):
            return NotImplemented
        return str.__eq__(self, other) or str.__eq__(self.wraps, other)

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = str.__hash__  # the registry key's hash: dict lookups find the wrapper, never "sdpa"'s entry


# `ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, <default>)`: the default is the
# function `attn_implementation="eager"` runs (not always named `eager_attention_forward`: TimesFM's is
# `simple_eager_attention_forward`, Llama 4's vision tower `vision_eager_attention_forward`).
_DEFAULT_RE = re.compile(
    r"(?:get_interface\(|getattr\(\s*ALL_ATTENTION_FUNCTIONS\s*,)\s*[\w.]+\s*,\s*(\w+)\s*\)"
)
# Kosmos-2.5's vision attention looks its function up as an attribute, `getattr(ALL_ATTENTION_FUNCTIONS, impl,
# eager_attention_forward)`, which never finds a registered function: it runs its eager function whatever the
# implementation. Traced, the wrapper is also set as that attribute and calls the eager function, as untraced.
_ATTRIBUTE_LOOKUP_RE = re.compile(r"getattr\(\s*ALL_ATTENTION_FUNCTIONS\s*,")
_attribute_lookup: dict[type, bool] = {}


def _looks_up_by_attribute(cls: type) -> bool:
    found = _attribute_lookup.get(cls)
    if found is None:
        found = _attribute_lookup[cls] = bool(_ATTRIBUTE_LOOKUP_RE.search(getsource(cls.forward)))
    return found
_eager_fns: dict[type, Callable[..., Any]] = {}


def _eager_fn(module: torch.nn.Module) -> Callable[..., Any]:
    """The eager attention function the module's class falls back to (what `attn_implementation="eager"` runs)."""
    cls = type(module)
    fn = _eager_fns.get(cls)
    if fn is not None:
        return fn
    file = sys.modules.get(cls.__module__)
    found = _DEFAULT_RE.search(getsource(cls.forward))
    fn = getattr(file, found.group(1), None) if found else None
    if not callable(fn):
        fn = getattr(file, "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    _eager_fns[cls] = fn
    return fn


def _all_configs(model: torch.nn.Module) -> list[Any]:
    from transformers import PretrainedConfig

    seen: dict[int, Any] = {}
    todo = [getattr(m, "config", None) for m in model.modules()]
    while todo:
        c = todo.pop()
        if not isinstance(c, PretrainedConfig) or id(c) in seen:
            continue
        seen[id(c)] = c
        for key in getattr(c, "sub_configs", {}) or {}:
            todo.append(getattr(c, key, None))
    return list(seen.values())


def _as_keywords(fn: Callable[..., Any], *first: Any) -> dict[str, Any]:
    *five, args, kwargs = first
    sig = inspect.signature(fn)
    bound = sig.bind(*five, *args, **kwargs).arguments
    names = list(sig.parameters)
    out: dict[str, Any] = {}
    for name, value in bound.items():
        if name in names[:5]:
            continue
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


class _Registration:
    """The wrappers of one attachment: id(module) -> binding, and the original functions."""

    def __init__(self) -> None:
        self.bindings: dict[int, SiteBinding] = {}
        self.names: dict[str, str] = {}  # original implementation -> registered name
        self.modality: dict[int, str | None] = {}  # id(module) -> what its tokens are (text, image)

    def wrapper(self, impl: str) -> Callable[..., Any]:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"] if impl == "sdpa" else None

        def original_for(module: torch.nn.Module) -> Callable[..., Any]:
            if sdpa is not None and not _looks_up_by_attribute(type(module)):
                return sdpa
            return _eager_fn(module)

        def attention(
            module: torch.nn.Module,
            query: torch.Tensor,
            key: torch.Tensor,
            value: torch.Tensor,
            attention_mask: torch.Tensor | None,
            *args: Any,
            **kwargs: Any,
        ) -> tuple[torch.Tensor, torch.Tensor | None]:
            original = original_for(module)
            binding = self.bindings.get(id(module))
            if binding is None:
                return original(module, query, key, value, attention_mask, *args, **kwargs)
            if args:  # rare: extra arguments passed by position; name them as the original function does
                kwargs = _as_keywords(original, module, query, key, value, attention_mask, args, kwargs)
            layer = binding.enter()
            if layer is None:
                return original(module, query, key, value, attention_mask, **kwargs)
            modality = self.modality.get(id(module))
            ran = "eager" if original is not sdpa else impl  # what the module runs untraced
            return _traced(binding, layer, modality, ran, original, module, query, key, value, attention_mask, kwargs)

        attention.__name__ = f"attntrace_{impl}_attention"
        return attention


def _traced(
    binding: SiteBinding,
    layer: LayerCall,
    modality: str | None,
    impl: str,
    original: Callable[..., Any],
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    scale = kwargs.get("scaling")
    q_len = query.shape[-2]
    causal_flag = kwargs.get("is_causal")
    if causal_flag is None:
        causal_flag = getattr(module, "is_causal", False)
    # Only sdpa turns a missing mask into causal masking (see `sdpa_attention_forward`); eager never does.
    is_causal = bool(impl == "sdpa" and mask is None and q_len > 1 and causal_flag)
    native_weights: list[torch.Tensor | None] = []

    def native() -> torch.Tensor:
        out, weights = original(module, query, key, value, mask, **kwargs)
        native_weights.append(weights)
        return out

    kernel_weights: list[torch.Tensor | None] = []

    def kernel_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        out, weights = original(module, q, k, v, m, **kwargs)
        kernel_weights.append(weights)
        return out.transpose(1, 2)

    eager = _eager_fn(module)

    def probs_fn(call: AttentionCall, rows: slice | None) -> torch.Tensor:
        if rows is None and native_weights and native_weights[0] is not None and not call.inputs_edited:
            return native_weights[0].float()
        q = call.query
        m = call.attn_mask
        # A boolean mask is sdpa's keep-mask; eager's own function reads it as the model ran it (Grounding DINO's
        # text encoder hands eager a boolean mask, which that function adds as 0/1).
        if m is not None and m.dtype == torch.bool and impl != "eager":
            m = torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill(~m, torch.finfo(q.dtype).min)
        if m is None and call.is_causal:
            lk = call.key.shape[-2]
            allowed = torch.ones(q.shape[-2], lk, dtype=torch.bool, device=q.device).tril()
            m = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~allowed, torch.finfo(q.dtype).min
            )
        kw = {k: v for k, v in kwargs.items() if k not in ("scaling", "dropout", "is_causal")}
        if rows is not None:
            q = q[:, :, rows]
            if m is not None and m.shape[-2] != 1:
                m = m[..., rows, :]
            bias = kw.get("position_bias")
            if isinstance(bias, torch.Tensor) and bias.dim() >= 2 and bias.shape[-2] != 1:
                kw["position_bias"] = bias[..., rows, :]
        # The model's own eager function with dropout off: exactly what `output_attentions=True` returns.
        weights = eager(module, q, call.key, call.value, m, scaling=call.scale, dropout=0.0, **kw)[1]
        return weights.float()

    kind = binding.site.kind
    outcome = run_call(binding, layer, KernelCall(
        query=query, key=key, value=value, attn_mask=mask, scale=scale, is_causal=is_causal,
        enable_gqa=key.shape[1] != query.shape[1], kernel_fn=kernel_fn, native_fn=native,
        to_canonical=lambda t: t.transpose(1, 2), probs_fn=probs_fn,
        layout=token_layout(kind, modality, q_len, key.shape[-2]),
    ))  # fmt: skip
    out, call = outcome.output, outcome.call
    assert out is not None
    if outcome.native:
        return out, native_weights[0] if native_weights else None
    out = out.transpose(1, 2).contiguous()
    # The weights the original returns: eager's are the probabilities the layer used (edited ones where an
    # editor changed them); sdpa returns none, and neither may a traced sdpa site: `output_attentions=True`
    # must give what it gives untraced (observers read `call.probs`).
    if impl != "eager":
        return out, None
    probs = call.computed_probs
    if probs is not None:
        return out, probs.to(value.dtype)
    return out, kernel_weights[-1] if kernel_weights else None


class TransformersAdapter(Adapter):
    """Traces HF transformers 5.x models whose attention goes through `ALL_ATTENTION_FUNCTIONS`."""

    name = "transformers"

    def applies_to(self, model: torch.nn.Module) -> bool:
        # Also a transformers model nested in another framework's model (diffusers' UniDiffuserTextDecoder
        # holds a GPT-2, AutoencoderRAE a DINOv2 encoder): its attention modules read the registry all the same.
        return is_transformers_model(model, nested=True)

    def __init__(self) -> None:
        self.modality: dict[str, str | None] = {}

    def find_sites(self, model: torch.nn.Module) -> list[Site]:
        sites = []
        modules = dict(model.named_modules())
        root_modality = token_modality(modules, "")
        for name, module in modules.items():
            if not name or getattr(module, "config", None) is None or not calls_registry(type(module)):
                continue
            impl = getattr(module.config, "_attn_implementation", None)
            ok = impl in _SUPPORTED or (isinstance(impl, str) and impl.startswith("attntrace_"))
            kind = kind_by_name(name, module)
            # Cross-attention keys are the encoder's tokens: the model's main input.
            self.modality[name] = root_modality if kind == "cross" else token_modality(modules, name)
            sites.append(
                Site(
                    name=name,
                    kind=kind,
                    module=module,
                    adapter=self.name,
                    processor_class=impl if isinstance(impl, str) else None,
                    heads=head_count(module),
                    note="" if ok else f"attn_implementation {impl!r}: load with 'sdpa' or 'eager' to trace",
                )
            )
        return sites

    def prepare(self, model: torch.nn.Module, bindings: list[SiteBinding]) -> Undo | None:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

        for b in bindings:
            impl = b.site.module.config._attn_implementation
            if isinstance(impl, str) and impl.startswith("attntrace_"):
                raise AttachError(
                    f"{type(model).__name__}: site {b.site.name!r} is already traced by another attached "
                    "tracer; detach it first"
                )
            if impl not in _SUPPORTED:
                raise AttachError(
                    f"{type(model).__name__}: site {b.site.name!r} uses attn_implementation={impl!r}; "
                    "attntrace traces 'sdpa' and "
                    "'eager' (load the model with attn_implementation='sdpa' or 'eager', or call "
                    "model.set_attn_implementation)"
                )
            module = b.site.module
            if impl == "eager" and getattr(module, "reorder_and_upcast_attn", False):
                # GPT-2 runs its own upcast kernel only when the implementation is literally "eager".
                raise AttachError(
                    f"{type(model).__name__}: site {b.site.name!r}: reorder_and_upcast_attn=True with eager "
                    "attention bypasses the attention registry; load with attn_implementation='sdpa' or set "
                    "reorder_and_upcast_attn=False"
                )
        reg = _Registration()
        reg.bindings = {id(b.site.module): b for b in bindings}
        reg.modality = {id(b.site.module): self.modality.get(b.site.name) for b in bindings}
        uid = next(_counter)
        saved: list[tuple[Any, Any]] = []
        by_attribute = any(_looks_up_by_attribute(type(b.site.module)) for b in bindings)
        for config in _all_configs(model):
            impl = config._attn_implementation_internal
            if impl not in _SUPPORTED:
                continue  # a config no traced module reads (checked above)
            name = reg.names.get(impl)
            if name is None:
                name = reg.names[impl] = RegistryName(f"attntrace_{uid}_{impl}", impl)
                wrapper = reg.wrapper(impl)
                AttentionInterface.register(name, wrapper)
                if by_attribute:
                    setattr(ALL_ATTENTION_FUNCTIONS, name, wrapper)
                AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
            saved.append((config, impl))
            # The internal attribute: the public setter would overwrite sub-configs' own settings.
            config._attn_implementation_internal = name
        done = False

        def undo() -> None:
            nonlocal done
            if done:
                return
            done = True
            for config, impl in saved:
                if config._attn_implementation_internal in reg.names.values():
                    config._attn_implementation_internal = impl
            for name in reg.names.values():
                AttentionInterface._global_mapping.pop(name, None)
                vars(ALL_ATTENTION_FUNCTIONS).pop(name, None)
                AttentionMaskInterface._global_mapping.pop(name, None)
            reg.bindings.clear()

        return undo

    def install(self, binding: SiteBinding) -> Undo:
        # The registry wrapper does the interception; the binding is already in its id -> binding table.
        return lambda: None
