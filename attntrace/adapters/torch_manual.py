"""Hand-written attention in plain PyTorch modules: `softmax(q·kᵀ·scale + mask) @ v` written inline.

The typical research block (timm's ViT `Attention`, nanoGPT's `CausalSelfAttention`, DiT blocks,
einsum-based `'bhid,bhjd->bhij'` attention, 3D `bmm` attention over (B·H, L, D) with a `num_heads`/`heads`
attribute, an `nn.Softmax` child module, or a flag choosing `F.scaled_dot_product_attention` or the
manual path) computes the attention in its own `forward`. This adapter reuses the machinery of the
hand-written transformers adapter (`hf_manual._ManualInterceptor`): the module's `forward` is shadowed
by one that runs it under a per-site torch-function mode catching the score product (query/key), the
softmax over the keys (probs) and the product with the values (value/output); an `F.sdpa` call in the
same module (the fused branch) is caught as usual.

Sites: modules of a model that is not a transformers `PreTrainedModel` (those keep the
`transformers-manual` path), whose class is not from torch/transformers (diffusers classes are, unless
they hold a processor: those are the diffusers adapter's; UNet1DModel's SelfAttention1d, AttentionPooling,
ConsisID's PerceiverAttention, LTX2AudioAttnBlock compute softmax attention by hand), that are named like
attention or hold a head count, and whose `forward` (or a `self.method` it calls) contains a softmax (or
the module has an `nn.Softmax` child) and a matrix product; innermost module wins (a module around
another adapter's site, such as a diffusers `Attention`, is not a site). The probabilities are
followed through views, casts and a transpose of their last two dims (`bmm(v, probs.permute(0, 2, 1))`).
At run time a softmax counts only when its input has the shape of a q·kᵀ product the module just computed.

Untraceable: when a model has no traceable attention at all, modules named like attention are listed
(`attntrace sites`) with the reason (no softmax over keys: linear attention...) and attach is refused
with an `AttachError` naming them. A 3D (B·H, Lq, Lk) score map with no head count is listed with a note
and observers that need per-head tensors are refused at attach.
"""

from __future__ import annotations

import torch

from ..core.errors import AttachError
from ..core.site import Site
from ..tracing.binding import SiteBinding
from ..tracing.handwritten import HEADS_UNKNOWN, PER_HEAD, heads_unknown, shadow_forward
from .base import Adapter, Undo
from .detect import (
    LINEAR_NOTE,
    hand_written,
    head_count,
    innermost,
    is_processor_site,
    is_sdpa_module,
    is_transformers_model,
    kind_by_name,
    plain_source,
    untraceable_note,
    weight_children,
)

__all__ = ["ManualTorchAdapter"]


class ManualTorchAdapter(Adapter):
    """Traces hand-written softmax attention in plain PyTorch modules (see the module docstring)."""

    name = "torch-manual"

    def applies_to(self, model: torch.nn.Module) -> bool:
        return isinstance(model, torch.nn.Module) and not is_transformers_model(model)

    def find_sites(self, model: torch.nn.Module) -> list[Site]:
        found = [(n, m) for n, m in model.named_modules() if hand_written(m)]

        # Modules traced by another adapter count as inner attention: a hand-written module around them
        # is not a site (innermost wins).
        # A processor module used only as a weight container by a hand-written module around it never runs
        # its processor: it does not make the module around it a non-innermost one.
        containers = {f"{n}.{c}" if n else c for n, m in found for c in weight_children(m)}
        others = [
            n for n, m in model.named_modules() if is_sdpa_module(m) or (is_processor_site(m) and n not in containers)
        ]
        sites = []
        for name, module in innermost(found, others):
            src = plain_source(type(module))
            heads = head_count(module)
            note, unavailable = "hand-written attention: probs and output editable, q/k/v read-only", frozenset()
            if heads_unknown(module, heads, src):
                note, unavailable = HEADS_UNKNOWN, PER_HEAD
            sites.append(
                Site(
                    name=name or type(module).__name__,
                    kind=kind_by_name(name, module),
                    module=module,
                    adapter=self.name,
                    processor_class="softmax (hand-written)",
                    heads=heads,
                    note=note,
                    unavailable=unavailable,
                    inputs_editable=False,
                )
            )
        return sites

    def find_untraceable(self, model: torch.nn.Module) -> list[Site]:
        found = [(n, m) for n, m in model.named_modules() if untraceable_note(m)]
        sites = []
        for name, module in innermost(found, []):
            note = untraceable_note(module) or ""
            sites.append(
                Site(
                    name=name or type(module).__name__,
                    kind="linear" if note == LINEAR_NOTE else "self",
                    module=module,
                    adapter=self.name,
                    processor_class="(not traceable)",
                    heads=head_count(module),
                    probs=False,
                    editable=False,
                    note=note,
                    unavailable=PER_HEAD,
                    inputs_editable=False,
                    traceable=False,
                )
            )
        return sites

    def prepare(self, model: torch.nn.Module, bindings: list[SiteBinding]) -> Undo | None:
        for b in bindings:
            if not b.site.traceable:
                raise AttachError(
                    f"{type(model).__name__}: site {b.site.name!r} ({b.site.module_class}) cannot be traced: "
                    f"{b.site.note}"
                )
        return None

    def install(self, binding: SiteBinding) -> Undo:
        return shadow_forward(binding, binding.site.heads, plain=True)
