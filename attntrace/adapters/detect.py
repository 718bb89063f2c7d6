"""Every "is this attention, how many heads, which kind" heuristic, stated once for all adapters.

Adapters find sites by reading classes: which attributes a module holds, what its `forward` source
calls. The rules live here so that two adapters never answer the same question differently:
- source reading: `forward_mentions`, `forward_source` (forward plus the `self.helper(...)` methods it
  calls, one level), with a bytecode fallback for classes without source;
- the softmax / matrix-product patterns of hand-written attention (`SOFTMAX_RE`, `PRODUCT_RE`, `QK_RE`);
- `head_count`, `looks_like_attention`, `kind_by_name`, and diffusers' `processor_kind`;
- which modules are whose: `is_processor_site` (diffusers), `calls_registry` (transformers),
  `is_sdpa_module` / `calls_functional_mha` (plain PyTorch), `hand_written` / `untraceable_note` (hand-written
  softmax).

About 430 lines: the rules are many small predicates, and keeping them in one place is the point of the
module (split by adapter, two adapters would again answer "is this module attention?" differently).
"""

from __future__ import annotations

import dis
import inspect
import re
import sys
from collections.abc import Callable
from typing import Any

import torch

from ..core.site import Kind

__all__ = [
    "HEAD_ATTRS",
    "PRODUCT_RE",
    "QK_RE",
    "SOFTMAX_RE",
    "calls_functional_mha",
    "calls_registry",
    "called_with_context",
    "calls_sdpa",
    "concat_order",
    "conv_single_head",
    "forward_mentions",
    "forward_source",
    "getsource",
    "hand_written",
    "head_count",
    "innermost",
    "is_linear_processor",
    "is_processor_site",
    "is_sdpa_module",
    "is_transformers_model",
    "kind_by_name",
    "LINEAR_NOTE",
    "looks_like_attention",
    "named_attention",
    "plain_source",
    "processor_kind",
    "token_modality",
    "untraceable_note",
    "weight_children",
]

# -- source reading -------------------------------------------------------------------------------
_mentions: dict[tuple[type, str], bool] = {}
_sources: dict[tuple[Any, ...], str] = {}


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


def getsource(fn: object) -> str:
    """`inspect.getsource(fn)`, or source-like text from its bytecode where there is no source."""
    try:
        return inspect.getsource(fn)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return _code_text(fn)


def forward_mentions(cls: type, needle: str) -> bool:
    """Whether the source of `cls.forward` contains `needle` (cached per class and needle)."""
    key = (cls, needle)
    cached = _mentions.get(key)
    if cached is None:
        try:
            source = inspect.getsource(cls.forward)  # type: ignore[attr-defined]
        except (OSError, TypeError):
            source = ""
        cached = _mentions[key] = needle in source
    return cached


def forward_source(cls: type, helper_module_ok: Callable[[str], bool]) -> str:
    """`cls.forward`'s source plus that of the `self.method(...)` helpers it calls (one level) whose
    defining module passes `helper_module_ok`; cached per class and rule."""
    key = (cls, helper_module_ok)
    cached = _sources.get(key)
    if cached is not None:
        return cached
    src = getsource(cls.forward)  # type: ignore[attr-defined]
    parts = [src]
    for name in sorted(set(re.findall(r"self\.(\w+)\(", src))):
        fn = getattr(cls, name, None)
        if inspect.isfunction(fn) and helper_module_ok(getattr(fn, "__module__", "") or ""):
            parts.append(getsource(fn))
    out = _sources[key] = "\n".join(parts)
    return out


# -- hand-written attention patterns --------------------------------------------------------------
#: A softmax in source (`XSoftmax.apply(`: DeBERTa-v1-style masked softmax as an autograd Function).
SOFTMAX_RE = re.compile(r"softmax\(|nn\.Softmax\b|Softmax\.apply\(")
#: A matrix product in source (`matmul_qk(`: SqueezeBERT multiplies through small wrapper modules);
#: `a @ b` needs an operand on both sides on one line (a decorator line is not a product).
PRODUCT_RE = re.compile(r"\b(matmul\w*|bmm|baddbmm|einsum)\(|[\w\)\]][ \t]*@[ \t]*[\w\(]")
#: A product that can give query and key (not einsum).
QK_RE = re.compile(r"\b(matmul\w*|bmm|baddbmm)\(|[\w\)\]][ \t]*@[ \t]*[\w\(]")

# -- heads and kinds ------------------------------------------------------------------------------
HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "heads", "nhead", "attention_heads")
_CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
# Names of cross-attention submodules in encoder-decoder families (T5, BART/Whisper/Marian, BERT decoders).
_CROSS_NAMES = ("EncDecAttention", "encoder_attn", "crossattention", "cross_attn")


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def head_count(module: torch.nn.Module) -> int | None:
    """The number of query heads of an attention module, from its attributes or configuration."""
    for attr in HEAD_ATTRS:
        v = getattr(module, attr, None)
        if _positive_int(v):
            return v  # type: ignore[return-value]
    if conv_single_head(module):
        return 1
    for name in weight_children(module):  # the head count of the attention module whose weights it uses
        v = getattr(getattr(module, name), "heads", None)
        if _positive_int(v):
            return v  # type: ignore[return-value]
    v = getattr(getattr(module, "config", None), "num_attention_heads", None)
    return v if _positive_int(v) else None


def conv_single_head(module: torch.nn.Module) -> bool:
    """An LDM-style attention block (taming-transformers' `AttnBlock`: Chameleon's and Janus's VQ-VAE,
    LTX-2's audio VAE): q/k/v are 1×1 convolutions over all channels (no groups), the scores one product
    `bmm((B, HW, C), (B, C, HW))`, and the forward never mentions heads: 3D scores (B, Lq, Lk), one head."""
    convs = [c for c in module.children()
             if isinstance(c, _CONVS) and all(k == 1 for k in c.kernel_size) and c.groups == 1]  # fmt: skip
    if len(convs) < 3 or len({c.out_channels for c in convs}) != 1:
        return False
    cls = type(module)
    return forward_mentions(cls, "bmm(") and not forward_mentions(cls, "head")


def kind_by_name(name: str, module: torch.nn.Module) -> Kind:
    """`cross` for modules declared or named as cross-attention, else `self` (transformers, plain PyTorch)."""
    if getattr(module, "is_cross_attention", False) is True or "Cross" in type(module).__name__:
        return "cross"
    parts = name.split(".")
    if any(p in _CROSS_NAMES for p in parts[-2:]) or "cross" in parts[-1].lower():
        return "cross"
    return "self"


def looks_like_attention(module: torch.nn.Module) -> bool:
    """Named like attention, holding a head count, or computing attention with a child's weights
    (keeps MoE routers, pooling and heads' softmaxes out)."""
    name = type(module).__name__.lower()
    return (
        any(w in name for w in ("att", "mhsa", "performer"))
        or any(_positive_int(vars(module).get(a)) for a in HEAD_ATTRS)
        or bool(weight_children(module))
    )


def named_attention(module: torch.nn.Module) -> bool:
    """Whether the class is named like attention (listing untraceable modules uses only the name)."""
    name = type(module).__name__.lower()
    return any(w in name for w in ("attention", "attn", "mhsa", "performer"))


def token_modality(modules: dict[str, torch.nn.Module], name: str) -> str | None:
    """`text` or `image`: what the tokens at site `name` are, from the nearest enclosing transformers model's
    main input (`input_ids` or `pixel_values`); None for other inputs (audio features...) or no model."""
    parts = name.split(".")
    for n in range(len(parts) - 1, -1, -1):
        main = getattr(modules.get(".".join(parts[:n])), "main_input_name", None)
        if isinstance(main, str):
            return {"input_ids": "text", "pixel_values": "image"}.get(main)
    return None


# -- diffusers processors -------------------------------------------------------------------------
# Linear attention keeps no (Lq, Lk) probability matrix: these processors are sites of kind `linear`.
_LINEAR_MARKERS = ("LinearAttnProcessor", "MultiscaleAttnProcessor", "SanaLinear", "LiteLA")


def is_linear_processor(processor: Any) -> bool:
    """Whether a processor computes linear attention (no probabilities exist)."""
    name = type(processor).__name__
    return any(m in name for m in _LINEAR_MARKERS)


def is_processor_site(module: torch.nn.Module) -> bool:
    """A diffusers attention module: holds a `processor` (and `set_processor`/`get_processor`)."""
    processor = getattr(module, "processor", None)
    if processor is None:
        return False
    if hasattr(module, "set_processor") or hasattr(module, "get_processor"):
        return True
    # MochiAttention (diffusers 0.42) holds a processor but has no set_processor/get_processor; a traced
    # one holds attntrace's `Traced<Name>` proxy, whose name keeps the processor's.
    return callable(processor) and "Processor" in type(processor).__name__


# Concatenation of a text stream and the image stream into one sequence, in source: which comes first.
_ENC = r"\w*(?:encoder|context|txt|text|caption)\w*"
_HID = r"(?!\w*(?:encoder|context|txt|text|caption))\w*hidden\w*"
_TEXT_FIRST_RE = re.compile(rf"torch\.(?:cat|concat)\(\s*\[\s*{_ENC}\s*,\s*{_HID}\s*\]")
_IMAGE_FIRST_RE = re.compile(rf"torch\.(?:cat|concat)\(\s*\[\s*{_HID}\s*,\s*{_ENC}\s*\]")


def concat_order(source: str) -> bool | None:
    """Whether `source` concatenates text tokens before image tokens (True), after them (False), or
    neither / both (None), judged from `torch.cat([encoder_hidden_states, hidden_states])`-style calls."""
    text_first = bool(_TEXT_FIRST_RE.search(source))
    image_first = bool(_IMAGE_FIRST_RE.search(source))
    return None if text_first == image_first else text_first


def processor_kind(module: torch.nn.Module, processor: Any) -> Kind:
    """The kind of a diffusers attention module from its configuration (the site's default)."""
    if is_linear_processor(processor):
        return "linear"
    if getattr(module, "is_cross_attention", False) is True:
        return "cross"
    if getattr(module, "added_kv_proj_dim", None) is not None or getattr(module, "add_k_proj", None) is not None:
        return "joint"
    return "self"


def called_with_context(name: str, modules: dict[str, torch.nn.Module]) -> bool:
    """Whether the module `name` is cross-attention by how its parent calls it or by its name: the
    parent's forward passes it `encoder_hidden_states=` (not None), or its name says `cross`."""
    parent_name, _, child = name.rpartition(".")
    if "cross" in child.lower():
        return True
    parent = modules.get(parent_name)
    if parent is None or type(parent).forward is torch.nn.Module.forward or not child.isidentifier():
        return False
    src = getsource(type(parent).forward)
    for m in re.finditer(rf"self\.{child}\(", src):
        depth, i = 1, m.end()
        while i < len(src) and depth:  # the call's own argument text, up to its closing parenthesis
            depth += {"(": 1, ")": -1}.get(src[i], 0)
            i += 1
        if re.search(r"encoder_hidden_states\s*=\s*(?!None\b)\w", src[m.end() : i]):
            return True
    return False


# -- whose module ---------------------------------------------------------------------------------
def is_transformers_model(model: torch.nn.Module, *, nested: bool = False) -> bool:
    """Whether `model` is a transformers `PreTrainedModel` (`nested`: or contains one); False without
    transformers imported."""
    if "transformers" not in sys.modules:
        return False
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    if nested:
        return any(isinstance(m, PreTrainedModel) for m in model.modules())
    return isinstance(model, PreTrainedModel)


def calls_registry(cls: type) -> bool:
    """Whether `cls.forward` calls transformers' attention-function registry."""
    return cls.forward is not torch.nn.Module.forward and forward_mentions(cls, "ALL_ATTENTION_FUNCTIONS")


_SDPA_CALL = "scaled_dot_product_attention("
_helper_cache: dict[tuple[type, str], bool] = {}


def calls_sdpa(cls: type) -> bool:
    """Whether `cls.forward` calls `scaled_dot_product_attention`, directly or through a helper method of
    the class (static and class methods included; e.g. diffusers' `VidTokAttnBlock.attention`)."""
    return _calls(cls, _SDPA_CALL)


_FUNCTIONAL_MHA_CALL = "multi_head_attention_forward("


def calls_functional_mha(cls: type) -> bool:
    """Whether `cls.forward` calls `F.multi_head_attention_forward` itself or through a helper method of the
    class (WavLM's attention, with its gated relative position bias as the mask)."""
    return not issubclass(cls, torch.nn.MultiheadAttention) and _calls(cls, _FUNCTIONAL_MHA_CALL)


def _calls(cls: type, needle: str) -> bool:
    if cls.forward is torch.nn.Module.forward:
        return False
    if forward_mentions(cls, needle):
        return True
    cached = _helper_cache.get((cls, needle))
    if cached is None:
        cached = _helper_cache[(cls, needle)] = _helper_calls(cls, needle)
    return cached


def _helper_calls(cls: type, needle: str) -> bool:
    try:
        source = inspect.getsource(cls.forward)  # type: ignore[attr-defined]
    except (OSError, TypeError):
        return False
    for name in set(re.findall(r"self\.(\w+)\(", source)):
        # Only methods of the class itself: a submodule attribute lives on the instance and is a site of its own.
        helper = inspect.getattr_static(cls, name, None)
        if isinstance(helper, (staticmethod, classmethod)):
            helper = helper.__func__
        if not inspect.isfunction(helper) or helper.__name__ == "forward":
            continue
        try:
            if needle in inspect.getsource(helper):
                return True
        except (OSError, TypeError):
            continue
    return False


def is_sdpa_module(module: torch.nn.Module) -> bool:
    """A plain PyTorch attention site: `nn.MultiheadAttention`, or a module calling `F.sdpa` itself
    (one with a hand-written softmax branch too is the hand-written adapter's)."""
    return isinstance(module, torch.nn.MultiheadAttention) or calls_functional_mha(type(module)) or (
        calls_sdpa(type(module)) and not hand_written(module)
    )


_FOREIGN = ("torch.", "transformers.", "diffusers.")
# Framework classes whose hand-written attention the plain hand-written adapter claims: diffusers modules
# computing softmax attention inline (SelfAttention1d, AttentionPooling, PerceiverAttention...).
# diffusers' own `Attention`-like modules (those holding a processor) stay the diffusers adapter's.
_OWN_FOREIGN = ("diffusers.",)


def _not_torch_or_transformers(module_name: str) -> bool:
    return not module_name.startswith(_FOREIGN[:2])


def plain_source(cls: type) -> str:
    """`cls.forward`'s source plus its own (not torch's or transformers') helpers' sources."""
    return forward_source(cls, _not_torch_or_transformers)


def weight_children(module: torch.nn.Module) -> list[str]:
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
        src = plain_source(cls)
        if re.search(rf"self\.{name}\.\w", src) and not re.search(rf"self\.{name}\(", src):
            out.append(name)
    return out


def _own_forward(module: torch.nn.Module) -> bool:
    cls = type(module)
    if cls.forward is torch.nn.Module.forward:
        return False
    if cls.__module__.startswith(_FOREIGN) and not cls.__module__.startswith(_OWN_FOREIGN):
        return False
    # A diffusers module holding a processor is the diffusers adapter's site, whatever its forward does.
    return not (cls.__module__.startswith(_OWN_FOREIGN) and getattr(module, "processor", None) is not None)


def _has_softmax(module: torch.nn.Module, src: str) -> bool:
    return bool(SOFTMAX_RE.search(src)) or any(isinstance(c, torch.nn.Softmax) for c in module.children())


def hand_written(module: torch.nn.Module) -> bool:
    """Whether a plain PyTorch (or diffusers, processor-less) module computes softmax attention by hand."""
    if not _own_forward(module) or not looks_like_attention(module):
        return False
    src = plain_source(type(module))
    return _has_softmax(module, src) and bool(PRODUCT_RE.search(src))


LINEAR_NOTE = (
    "no softmax over keys: linear (kernelised) attention computes φ(q)·(φ(k)ᵀ·v) and has no (Lq, Lk) "
    "probability matrix"
)
_NOTHING = (
    "no softmax over keys and no matrix product in its forward: no attention computation attntrace can "
    "intercept here"
)


def untraceable_note(module: torch.nn.Module) -> str | None:
    """Why an attention-looking module (by its class name) cannot be traced, or None."""
    if not _own_forward(module) or not named_attention(module):
        return None
    src = plain_source(type(module))
    if _has_softmax(module, src):
        return None
    return LINEAR_NOTE if PRODUCT_RE.search(src) else _NOTHING


def innermost(found: list[tuple[str, torch.nn.Module]], others: list[str]) -> list[tuple[str, torch.nn.Module]]:
    """The modules of `found` with no other attention module (of `found` or `others`) below them."""
    names = [n for n, _ in found] + others
    out = []
    for name, module in found:
        prefix = f"{name}." if name else ""
        if not any(o != name and o.startswith(prefix) for o in names):
            out.append((name, module))
    return out
