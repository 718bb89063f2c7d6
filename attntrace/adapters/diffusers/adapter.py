"""diffusers adapter: every module holding a `processor` is a site; a proxy wraps that processor.

Sites are found the way diffusers itself finds them (modules with `set_processor`/`get_processor`
and a `processor`), by walking `named_modules()`, so models without `attn_processors` are covered
too. The proxy is installed per site (never per processor object: SD3 shares one processor between
two modules), and the undo restores the very same processor object.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ...core.errors import AttachError, EditError
from ...core.site import Site
from ...tracing.binding import LayerCall, SiteBinding
from ...tracing.run import KernelCall, run_call
from ..base import Adapter, Undo
from ..detect import called_with_context, head_count, is_processor_site, processor_kind
from .dispatch import ProcessorInterceptor, install_dispatch_wrappers, patch_classic_path
from .layout import Joining, ModelInputs, install_input_hook, joining, resolve
from .proxy import AttentionProxy, make_proxy

__all__ = ["DiffusersAdapter"]


def _self_in_cross_module(name: str, modules: dict[str, torch.nn.Module]) -> bool:
    """A module built as cross-attention (`is_cross_attention`) that the model only calls as self-attention.

    Kandinsky3AttentionBlock with `context_dim=None` builds `Attention(num_channels, num_channels)` (so
    `is_cross_attention` is True) and its block calls it with the image features as context. diffusers 0.42
    places that block first: `attentions[0]` of a Kandinsky3 up/down block is called without context (self),
    `attentions[1:]` with the text context (cross). Decided statically, so `kind` rules select these sites.
    """
    parent_name = name.rpartition(".")[0]
    parent = modules.get(parent_name)
    return type(parent).__name__ == "Kandinsky3AttentionBlock" and parent_name.endswith("attentions.0")


def _set_processor(module: torch.nn.Module, processor: Any) -> None:
    setter = getattr(module, "set_processor", None)
    if setter is not None:
        setter(processor)
    else:
        module.processor = processor


@dataclass(eq=False)
class ProcessorSite:
    """One installed proxy: what the proxy forwards to (`original`, `call_processor`)."""

    binding: SiteBinding
    original: Any
    interceptor: ProcessorInterceptor
    replaced: bool = False

    def call_processor(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The proxy's `__call__`: gate, then run the processor under the interceptor."""
        binding = self.binding
        layer = binding.enter(defer_compiled=binding.site.kind != "linear")
        if layer is None:
            return self.original(*args, **kwargs)
        if binding.site.kind == "linear":
            return _run_linear(binding, layer, self.interceptor.inputs, self.original, args, kwargs)
        hidden = args[1] if len(args) > 1 else kwargs.get("hidden_states")
        context = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        if isinstance(hidden, torch.Tensor):
            if hidden.dim() == 4:  # (B, C, H, W) spatial input
                layer.image_hw = (int(hidden.shape[2]), int(hidden.shape[3]))
                layer.image_len = layer.image_hw[0] * layer.image_hw[1]
            elif hidden.dim() == 3:
                layer.image_len = int(hidden.shape[1])
        if isinstance(context, torch.Tensor) and context.dim() == 3:
            layer.text_len = int(context.shape[1])
        return self.interceptor.run(layer, self.original, args, kwargs)


def _refuse_context_parallel(model: torch.nn.Module) -> None:
    """Context parallelism (`enable_parallelism(ContextParallelConfig(...))`) splits every attention call across
    ranks: Ulysses runs each rank's kernel on a share of the heads, ring on chunks of the keys merged by
    log-sum-exp outside any kernel call. No rank sees a whole call, so attaching is refused, by name."""
    config = getattr(model, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    if cp is None:
        return
    ring, ulysses = getattr(cp, "ring_degree", None), getattr(cp, "ulysses_degree", None)
    raise AttachError(
        f"{type(model).__name__} runs with context parallelism (ring_degree={ring}, ulysses_degree={ulysses}): "
        "each rank's attention kernel sees only part of every call (Ulysses: a share of the heads; ring: key chunks "
        "merged by log-sum-exp), so attntrace cannot give whole calls or probabilities; trace a run without "
        "enable_parallelism(...)"
    )


class DiffusersAdapter(Adapter):
    """Traces diffusers attention modules (`Attention`, `AttentionModuleMixin` and kin) through their processors."""

    name = "diffusers"

    def __init__(self) -> None:
        self.joins: dict[str, Joining] = {}
        self.inputs = ModelInputs()

    def applies_to(self, model: torch.nn.Module) -> bool:
        return any(is_processor_site(m) for m in model.modules())

    def find_sites(self, model: torch.nn.Module) -> list[Site]:
        sites = []
        modules = dict(model.named_modules())
        for name, module in modules.items():
            if not name or not is_processor_site(module):
                continue
            processor = module.processor
            if isinstance(processor, AttentionProxy):
                processor = processor.wrapped_processor
            kind = processor_kind(module, processor)
            if kind == "cross" and _self_in_cross_module(name, modules):
                kind = "self"
            join = joining(name, processor, modules, model) if kind != "linear" else None
            if join is not None and kind == "cross" and join.where != "family":
                join = None  # declared cross-attention: the keys are the context, whatever the source joins
            layout = ""
            if join is not None:
                self.joins[name] = join
                if join.text_first is None:
                    layout = f"unknown: {join.note or 'the order of text and image tokens is unknown'}"
                else:
                    order = "text first" if join.text_first else "image first"
                    layout = f"{order}, joined by the {join.where}"
                kind = "joint"
            elif kind == "self" and not hasattr(module, "is_cross_attention") and called_with_context(name, modules):
                kind = "cross"  # a module that does not say `is_cross_attention`, called by its block with context
            sites.append(
                Site(
                    name=name,
                    kind=kind,
                    module=module,
                    adapter=self.name,
                    processor_class=type(processor).__name__,
                    heads=head_count(module),
                    probs=kind != "linear",
                    editable=kind != "linear",
                    note="linear attention: no probability matrix" if kind == "linear" else "",
                    layout=layout,
                )
            )
        return sites

    def prepare(self, model: torch.nn.Module, bindings: list[SiteBinding]) -> Undo | None:
        _refuse_context_parallel(model)
        undo_inputs = install_input_hook(model, self.inputs)
        undo_dispatch = install_dispatch_wrappers()

        def undo() -> None:
            undo_dispatch()
            undo_inputs()

        return undo

    def install(self, binding: SiteBinding) -> Undo:
        module = binding.site.module
        original = module.processor
        if isinstance(original, AttentionProxy):
            raise AttachError(
                f"site {binding.site.name!r} is already traced by another attached tracer; "
                "detach it first or add your observers to that tracer"
            )
        interceptor = ProcessorInterceptor(binding, self.joins.get(binding.site.name), self.inputs)
        state = ProcessorSite(binding, original, interceptor)
        proxy = make_proxy(original, state)
        _set_processor(module, proxy)
        undo_classic = patch_classic_path(module, interceptor)

        def undo() -> None:
            if undo_classic is not None:
                undo_classic()
            current = getattr(module, "processor", None)
            if current is proxy:
                _set_processor(module, original)
            elif current is not original and not state.replaced:
                state.replaced = True
                warnings.warn(
                    f"attntrace: the processor of site {binding.site.name!r} was replaced while the tracer was "
                    f"attached (now {type(current).__name__}); leaving the new processor in place",
                    RuntimeWarning,
                    stacklevel=4,
                )

        return undo


def _heads_view(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, C) or channels-last (B, H, W, C) -> (B, heads, L, C // heads)."""
    if t.dim() == 4:
        t = t.flatten(1, 2)
    c = t.shape[-1]
    h = heads if heads > 0 and c % heads == 0 else 1
    return t.unflatten(-1, (h, c // h)).transpose(1, 2)


def _run_linear(
    binding: SiteBinding,
    layer: LayerCall,
    inputs: ModelInputs,
    original: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Linear attention has no kernel to catch: q/k/v from the projections, output from to_out's input.

    q/k/v are the outputs of `to_q`/`to_k`/`to_v` (before the processor's norms and feature maps),
    the output is what enters `to_out` (heads not yet merged back by the projection); both in
    (B, H, L, D). They are read-only here: editors and probs are refused at attach for linear sites.
    """
    module = binding.site.module
    got: dict[str, torch.Tensor] = {}
    handles = []
    for name in ("to_q", "to_k", "to_v"):
        sub = getattr(module, name, None)
        if isinstance(sub, torch.nn.Module):
            handles.append(sub.register_forward_hook(lambda m, a, o, n=name: got.setdefault(n, o)))
    to_out = getattr(module, "to_out", None)
    if isinstance(to_out, (torch.nn.ModuleList, torch.nn.Sequential)) and len(to_out):
        to_out = to_out[0]
    if isinstance(to_out, torch.nn.Module):
        hook = to_out.register_forward_pre_hook(lambda m, a: got.setdefault("out", a[0]) if a else None)
        handles.append(hook)
    try:
        result = original(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    if not all(isinstance(got.get(n), torch.Tensor) for n in ("to_q", "to_k", "to_v", "out")):
        return result  # an unfamiliar linear processor: nothing we can read reliably
    heads = int(getattr(module, "heads", 1) or 1)
    q, k, v, out = (_heads_view(got[n], heads) for n in ("to_q", "to_k", "to_v", "out"))

    def no_kernel(*_: Any) -> torch.Tensor:
        name = binding.site.name
        raise EditError(f"site {name!r} is linear attention: it has no probabilities and cannot be edited")

    run_call(binding, layer, KernelCall(
        query=q, key=k, value=v, attn_mask=None, scale=None, is_causal=False, enable_gqa=False,
        kernel_fn=no_kernel, native_fn=lambda: out, probs_fn=lambda c, rows: no_kernel(),
        layout=resolve("linear", None, layer, inputs, q.shape[-2], k.shape[-2], None, binding.attachment.root_hw),
        extra={"linear": True},
    ), result=False)  # fmt: skip
    return result
