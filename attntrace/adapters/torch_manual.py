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

import dis
import inspect
import re
import sys
from typing import TYPE_CHECKING

import torch

from ..errors import AttachError
from ..site import Kind, Site
from .base import Adapter, Undo, forward_source
from .hf_manual import _PER_HEAD, HEADS_UNKNOWN, heads_unknown, shadow_forward

if TYPE_CHECKING:
    from ..tracer import Attachment, SiteBinding

__all__ = ["ManualTorchAdapter", "hand_written", "untraceable_note"]

_FOREIGN = ("torch.", "transformers.", "diffusers.")
# Classes whose hand-written attention this adapter claims although they come from a framework: diffusers
# modules computing softmax attention inline (SelfAttention1d, AttentionPooling, PerceiverAttention...).
# diffusers' own `Attention`-like modules (those holding a processor) stay the diffusers adapter's.
_OWN_FOREIGN = ("diffusers.",)
_SOFTMAX_RE = re.compile(r"softmax\(|nn\.Softmax\b")
_PRODUCT_RE = re.compile(r"\b(matmul|bmm|baddbmm|einsum)\(|\S\s*@\s*\S")
_HEAD_ATTRS = ("num_heads", "heads", "n_head", "n_heads", "num_attention_heads", "nhead", "attention_heads")
_LINEAR = (
    "no softmax over keys: linear (kernelised) attention computes φ(q)·(φ(k)ᵀ·v) and has no (Lq, Lk) "
    "probability matrix"
)
_NOTHING = (
    "no softmax over keys and no matrix product in its forward: no attention computation attntrace can "
    "intercept here"
)

def _code_text(fn: object) -> str:
    """Source-like text from a function's bytecode, for classes without source (exec'd code, a REPL):
    the names it uses written as calls (`softmax(`, `einsum(`, `self.helper(`) and `a @ b` for `@`."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return ""
    parts = []
    for ins in dis.get_instructions(code):
        if ins.opname in ("LOAD_ATTR", "LOAD_METHOD", "LOAD_GLOBAL", "LOAD_NAME") and isinstance(ins.argval, str):
            parts.append(f"self.{ins.argval}(" if ins.opname != "LOAD_GLOBAL" else f"{ins.argval}(")
        elif ins.opname in ("BINARY_OP", "BINARY_MATRIX_MULTIPLY") and "@" in (ins.argrepr or "@"):
            parts.append("a @ b")
    return " ".join(parts)


def _getsource(fn: object) -> str:
    try:
        return inspect.getsource(fn)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return _code_text(fn)


def _not_foreign(module_name: str) -> bool:
    return not module_name.startswith(_FOREIGN[:2])


def _source(cls: type) -> str:
    """`cls.forward`'s source plus that of the `self.method(...)` helpers it calls (one level)."""
    return forward_source(cls, _not_foreign, _getsource)


def _named_attention(module: torch.nn.Module) -> bool:
    name = type(module).__name__.lower()
    return any(w in name for w in ("attention", "attn", "mhsa", "performer"))


def _weight_children(module: torch.nn.Module) -> list[str]:
    """Children holding a processor (diffusers attention modules) that `module`'s forward uses only as
    weight containers: it reads `self.<child>.to_q(...)`, `.heads`... and never calls `self.<child>(...)`
    (SD3's IPAdapterTimeImageProjectionBlock computes the attention itself with its `attn` child's
    projections), so the child's processor never runs and the attention is `module`'s own."""
    cls = type(module)
    if not cls.__module__.startswith(_OWN_FOREIGN) or cls.forward is torch.nn.Module.forward:
        return []
    out = []
    for name, child in module.named_children():
        if getattr(child, "processor", None) is None:
            continue
        src = _source(cls)
        if re.search(rf"self\.{name}\.\w", src) and not re.search(rf"self\.{name}\(", src):
            out.append(name)
    return out


def _looks_like_attention(module: torch.nn.Module) -> bool:
    """Named like attention or holding a head count (keeps pooling/routing softmaxes out)."""
    return (
        _named_attention(module)
        or any(isinstance(vars(module).get(a), int) and not isinstance(vars(module).get(a), bool) for a in _HEAD_ATTRS)
        or bool(_weight_children(module))
    )


def _foreign(cls: type) -> bool:
    return cls.__module__.startswith(_FOREIGN) and not cls.__module__.startswith(_OWN_FOREIGN)


def _own_forward(module: torch.nn.Module) -> bool:
    cls = type(module)
    if cls.forward is torch.nn.Module.forward or _foreign(cls):
        return False
    # A diffusers module holding a processor is the diffusers adapter's site, whatever its forward does.
    return not (cls.__module__.startswith(_OWN_FOREIGN) and getattr(module, "processor", None) is not None)


def _has_softmax(module: torch.nn.Module, src: str) -> bool:
    return bool(_SOFTMAX_RE.search(src)) or any(isinstance(c, torch.nn.Softmax) for c in module.children())


def hand_written(module: torch.nn.Module) -> bool:
    """Whether `module` computes softmax attention by hand in its own forward (a site of this adapter)."""
    if not _own_forward(module) or not _looks_like_attention(module):
        return False
    src = _source(type(module))
    return _has_softmax(module, src) and bool(_PRODUCT_RE.search(src))


def untraceable_note(module: torch.nn.Module) -> str | None:
    """Why an attention-looking module (by its class name) cannot be traced, or None."""
    if not _own_forward(module) or not _named_attention(module):
        return None
    src = _source(type(module))
    if _has_softmax(module, src):
        return None
    return _LINEAR if _PRODUCT_RE.search(src) else _NOTHING


# Framework classes known to compute single-head attention over a 3D (B, L, L) bmm score map without a
# head-count attribute (LDM-style VAE attention blocks): their scores are split as one head.
_SINGLE_HEAD = frozenset({"diffusers.models.autoencoders.autoencoder_kl_ltx2_audio.LTX2AudioAttnBlock"})


def _heads(module: torch.nn.Module) -> int | None:
    if f"{type(module).__module__}.{type(module).__qualname__}" in _SINGLE_HEAD:
        return 1
    for attr in _HEAD_ATTRS:
        v = getattr(module, attr, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    for name in _weight_children(module):  # the head count of the attention module whose weights it uses
        v = getattr(getattr(module, name), "heads", None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _kind(name: str, module: torch.nn.Module) -> Kind:
    last = name.rpartition(".")[2].lower()
    return "cross" if "cross" in last or "Cross" in type(module).__name__ else "self"


def _innermost(found: list[tuple[str, torch.nn.Module]], others: list[str]) -> list[tuple[str, torch.nn.Module]]:
    names = [n for n, _ in found] + others
    out = []
    for name, module in found:
        prefix = f"{name}." if name else ""
        if not any(o != name and o.startswith(prefix) for o in names):
            out.append((name, module))
    return out


def _is_plain(model: torch.nn.Module) -> bool:
    if "transformers" in sys.modules:
        try:
            from transformers import PreTrainedModel
        except ImportError:
            return True
        return not isinstance(model, PreTrainedModel)
    return True


class ManualTorchAdapter(Adapter):
    """Traces hand-written softmax attention in plain PyTorch modules (see the module docstring)."""

    name = "torch-manual"

    def applies_to(self, model: torch.nn.Module) -> bool:
        return isinstance(model, torch.nn.Module) and _is_plain(model)

    def find_sites(self, model: torch.nn.Module) -> list[Site]:
        from .torch import _is_candidate

        found = [(n, m) for n, m in model.named_modules() if hand_written(m)]
        from .diffusers import _is_site as _processor_site

        # Modules traced by another adapter count as inner attention: a hand-written module around them
        # is not a site (innermost wins).
        # A processor module used only as a weight container by a hand-written module around it never runs
        # its processor: it does not make the module around it a non-innermost one.
        containers = {f"{n}.{c}" if n else c for n, m in found for c in _weight_children(m)}
        others = [
            n for n, m in model.named_modules() if _is_candidate(m) or (_processor_site(m) and n not in containers)
        ]
        sites = []
        for name, module in _innermost(found, others):
            src = _source(type(module))
            heads = _heads(module)
            note, unavailable = "hand-written attention: probs and output editable, q/k/v read-only", frozenset()
            if heads_unknown(module, heads, src):
                note, unavailable = HEADS_UNKNOWN, _PER_HEAD
            sites.append(
                Site(
                    name=name or type(module).__name__,
                    kind=_kind(name, module),
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
        for name, module in _innermost(found, []):
            note = untraceable_note(module) or ""
            sites.append(
                Site(
                    name=name or type(module).__name__,
                    kind="linear" if note == _LINEAR else "self",
                    module=module,
                    adapter=self.name,
                    processor_class="(not traceable)",
                    heads=_heads(module),
                    probs=False,
                    editable=False,
                    note=note,
                    unavailable=_PER_HEAD,
                    inputs_editable=False,
                    traceable=False,
                )
            )
        return sites

    def prepare(self, model: torch.nn.Module, attachment: Attachment, bindings: list[SiteBinding]) -> Undo | None:
        for b in bindings:
            if not b.site.traceable:
                raise AttachError(
                    f"{type(model).__name__}: site {b.site.name!r} ({b.site.module_class}) cannot be traced: "
                    f"{b.site.note}"
                )
        return None

    def install(self, binding: SiteBinding) -> Undo:
        return shadow_forward(binding, binding.site.heads, plain=True)

    def check_restored(self, binding: SiteBinding) -> str | None:
        if "forward" in vars(binding.site.module):
            return f"site {binding.site.name!r}: an instance-level forward is still set"
        return None
