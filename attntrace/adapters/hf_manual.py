"""Transformers attention written by hand (softmax inline, no attention registry): which classes, and refusals.

In transformers 5.24, 112 families (79 entirely, 33 next to registry attention) have attention
classes that compute `softmax(q·kᵀ + bias) @ v` in the module's own `forward` instead of calling
`ALL_ATTENTION_FUNCTIONS` (DeBERTa, BLOOM, Falcon eager, GPT-Neo, MPNet, XLNet, BLIP, LED's decoder,
SAM's vision encoder, BigBird-Pegasus' full encoder attention...; `benchmarks/hf_manual_census.md`).

Sites: modules of a `PreTrainedModel` whose `forward` (or a `self.method` it calls) contains a softmax
and a matrix product and does not use the registry; a module is not a site when one of its
descendants is an attention module (the innermost one computes the attention). Interception is the
shared hand-written engine (`attntrace.tracing.handwritten`).

Sliding-window attention (Longformer, LED's encoder) has no (Lq, Lk) matrix; its module returns the banded
probabilities with `output_attentions=True` (which does not change its computation): the site is traced
with `Site.probs_layout="banded"` (see `Layout.probs`), read-only, by a forward that asks for them.
Block-sparse attention (BigBird, BigBird-Pegasus) returns a (B, H, L, L) matrix filled on the attended
blocks: traced the same way with `probs_layout="block_sparse"` (repeated key blocks summed, see `_block_sparse`).
BigBird swaps its block-sparse modules for full attention inside `forward` on short inputs: the tracer follows
the swap onto the new module (`attntrace.adapters.hf_switch`).
Block-local attention (LongT5 local and transient-global) returns (B, blocks, H, block, 3·block + global):
`probs_layout="block_local"`; its output is returned after the output projection and is not exposed.
Multi-scale deformable attention (the DETR family) returns its softmax over each query's sampling points,
(B, Q, H, levels, points): `probs_layout="sampling_point"`, output not exposed. SLANet's additive attention
returns one decoder state's weights over the tokens: `probs_layout="additive"`, (B, 1, 1, L).

What cannot be traced is listed with a note and refused at attach: LSH/chunked attention normalised with
`logsumexp` (Reformer), deformable attention that does not return its weights, and I-BERT built with
`quant_mode=True` (an integer approximation of the softmax; with `quant_mode=False` it is traced). `query`,
`key`, `value` and the mask cannot be edited at hand-written sites (the scores are not rebuilt from them);
observers that edit them are refused at attach.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import torch

from ..core.errors import AttachError, EditError
from ..core.layout import token_layout
from ..core.site import Site
from ..tracing.binding import SiteBinding
from ..tracing.handwritten import HEADS_UNKNOWN, PER_HEAD, ManualCall, heads_unknown, shadow_forward
from ..tracing.run import KernelCall, run_call
from .base import Adapter, Undo
from .detect import (
    PRODUCT_RE,
    QK_RE,
    SOFTMAX_RE,
    calls_registry,
    calls_sdpa,
    forward_source,
    head_count,
    is_transformers_model,
    kind_by_name,
    looks_like_attention,
    token_modality,
)
from .hf_switch import SwitchNotice, follow_switch

__all__ = ["ADDITIVE", "BANDED", "BLOCK_SPARSE", "SAMPLING_POINT", "HFManualAdapter", "attention_source", "classify",
           "refusal_reason"]

# Sliding-window attention returns its banded probabilities with `output_attentions=True`: traced with
# `probs_layout="banded"` (see `Layout.probs`), read-only.
_BANDED_NEEDLE = "_sliding_chunks"
BANDED = (
    "sliding-window attention (Longformer/LED local attention): probs are banded, (B, H, L, global + 2w+1) "
    "as `output_attentions` returns them, not a token x token matrix; read-only (stats, save)"
)
BLOCK_SPARSE = (
    "block-sparse attention (BigBird): probs are (B, H, L, L), zero outside the attended global, sliding "
    "and random blocks, from the module's returned weights; read-only (stats, save)"
)
BLOCK_LOCAL = (
    "block-local attention (LongT5 local / transient-global): probs are (B, H, L, 3·block + global), each "
    "query's weights on the keys of its block and the two next to it, then on the transient global tokens, "
    "as `output_attentions` returns them; read-only (stats, save); output not exposed (returned projected)"
)
SAMPLING_POINT = (
    "multi-scale deformable attention (DETR family): probs are (B, H, Q, levels·points), each query's softmax "
    "over its own sampling points (reference point + learned offset, bilinearly sampled from each feature "
    "level: data-dependent locations, not exposed), as the module returns them; read-only (stats, save); "
    "output not exposed"
)
ADDITIVE = (
    "additive (Bahdanau) attention (SLANet): one decoder state's softmax over the L encoder tokens of "
    "score(tanh(W·h + U·s)), no q·kᵀ; probs are (B, 1, 1, L) as the module returns them; read-only (stats, "
    "save); q/k/v and output not exposed (the module returns the recurrent state)"
)
# Notes of read-only sites -> their `Site.probs_layout`.
_PRECOMPUTED = {BANDED: "banded", BLOCK_SPARSE: "block_sparse", BLOCK_LOCAL: "block_local",
                SAMPLING_POINT: "sampling_point", ADDITIVE: "additive"}  # fmt: skip
_REFUSALS = (
    ("self.w_g", "additive attention (SwiftFormer): a learned vector scores each token, (B, L, 1), and the "
     "softmax pools one global query; there is no softmax(q·kᵀ) over keys"),
    ("hard_softmax(", "slot assignment (GroupViT): the softmax runs over the groups (the query axis; one-hot "
     "in eval) and rows are then renormalised over keys; there is no softmax over keys"),
)  # fmt: skip
# Bahdanau-style additive attention (SLANet's attention GRU cell): `softmax(score(tanh(W·h + U·s)), dim=1)`
# over (B, L, 1) scores for one decoder state.
_ADDITIVE_RE = re.compile(r"\btanh\(")
_ADDITIVE = (
    "additive (Bahdanau) attention: scores are a linear layer on tanh(W·h + U·s), (B, L, 1), softmax over "
    "the tokens for one decoder state; there is no softmax(q·kᵀ) over keys"
)
# Modules whose attention is traced only in part: (source needle, what is not traced).
_PARTIAL = (
    ("compute_local_attention_representations", "only the global tokens' attention (Pegasus-X); the "
     "block-local attention concatenates global and local-block scores in one 5D softmax and slices the "
     "probabilities apart, no (Lq, Lk) matrix, and is not traced"),
)  # fmt: skip
_RETURNS_WEIGHTS_RE = re.compile(r"return output, attention_weights\s*$", re.M)
_DEFORMABLE = (
    "deformable attention: the softmax runs over sampling points around reference locations, not over "
    "keys; there is no (Lq, Lk) probability matrix"
)
_LOGSUMEXP = (
    "LSH/chunked attention normalised with logsumexp and exp (Reformer): probabilities are per hash "
    "bucket or chunk, with no softmax over the keys; its `output_attentions` weights (LSH) are per hash round "
    "in bucket-sorted order, mixed across rounds afterwards, so they are not the weight each key receives"
)


# -- which classes --------------------------------------------------------------------------------
def _from_transformers(module_name: str) -> bool:
    return module_name.startswith("transformers.")


def attention_source(cls: type) -> str:
    """`cls.forward`'s source plus that of the transformers helpers it calls as `self.method(...)`."""
    return forward_source(cls, _from_transformers)


def classify(cls: type) -> tuple[bool, str]:
    """(is a hand-written attention class, refusal note or '')."""
    if cls.forward is torch.nn.Module.forward or not cls.__module__.startswith("transformers."):
        return False, ""
    src = attention_source(cls)
    if "ALL_ATTENTION_FUNCTIONS" in src:
        return False, ""
    if SOFTMAX_RE.search(src) and ("grid_sample" in src or "sampling_locations" in src):
        # the module returns its softmax over sampling points (all transformers 5.24 members do)
        return True, SAMPLING_POINT if _RETURNS_WEIGHTS_RE.search(src) else _DEFORMABLE
    if not PRODUCT_RE.search(src):
        return False, ""
    if not SOFTMAX_RE.search(src):
        if "logsumexp(" in src:
            return True, _LOGSUMEXP
        return False, ""
    if _BANDED_NEEDLE in src and "output_attentions" in src:
        return True, BANDED
    if "bigbird_block_sparse_attention" in src and "attention_probs" in src:
        return True, BLOCK_SPARSE
    if "_concatenate_3_blocks" in src and "output_attentions" in src:
        return True, BLOCK_LOCAL
    for needle, why in _REFUSALS:
        if needle in src:
            return True, why
    if _ADDITIVE_RE.search(src) and "self.score(" in src:
        return True, ADDITIVE if re.search(r"return \w+, attn_weights\s*$", src, re.M) else _ADDITIVE
    return True, ""


_INTEGER_SOFTMAX = (
    "integer softmax (I-BERT with quant_mode=True): `IntSoftmax` approximates exp with an integer polynomial "
    "and no softmax runs, so there are no probabilities to intercept; build the model with quant_mode=False "
    "(its softmax is then a plain softmax) to trace it"
)


def _instance_refusal(module: torch.nn.Module) -> str | None:
    """Why this instance (not its class) cannot be traced: a quantised softmax submodule (I-BERT)."""
    softmax = getattr(module, "softmax", None)
    if isinstance(softmax, torch.nn.Module) and getattr(softmax, "quant_mode", False) is True:
        return _INTEGER_SOFTMAX
    return None


def refusal_reason(module: torch.nn.Module) -> str | None:
    """Why `module` (a hand-written attention module) cannot be traced, or None if it can."""
    ok, note = classify(type(module))
    if note in _PRECOMPUTED:
        return None
    return (note or _instance_refusal(module)) if ok else None


def _banded(module: torch.nn.Module, out: tuple[Any, ...]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Sliding-window probs (B, L, H, G + 2w+1) as (B, H, L, K), and their layout fields."""
    probs = out[1].transpose(1, 2)
    window = int(module.one_sided_attn_window_size)
    return probs, {"window": window, "global_keys": probs.shape[-1] - (2 * window + 1),
                   "global_probs": out[2] if len(out) > 2 else None}  # fmt: skip


def _block_sparse(module: torch.nn.Module, out: tuple[Any, ...]) -> tuple[torch.Tensor, dict[str, Any]]:
    """BigBird's (B, H, L, L) weights as the weight each key receives. At inference transformers draws no
    random blocks: each row's r random blocks are key block 0 again, attended besides block 0 itself (as a
    global block, or in q[1]'s window), and the returned matrix holds that weight once (rows sum to less
    than 1); the weight block 0 gets is (1 + r) times it. In training the random blocks avoid the window
    and global blocks and the weights are taken as they are."""
    probs = out[1]
    if not module.training:
        bs, r = int(module.block_size), int(module.num_random_blocks)
        probs = probs.clone()  # the caller's weights stay as transformers returns them
        probs[:, :, bs:-bs, :bs] *= 1 + r
    return probs, {"block_size": int(module.block_size)}


def _block_local(module: torch.nn.Module, out: tuple[Any, ...]) -> tuple[torch.Tensor, dict[str, Any]]:
    """LongT5's (B, blocks, H, block, 3·block + G) weights as (B, H, L, 3·block + G) (padding rows dropped)."""
    w = out[-1]
    b, nb, h, bl, k = w.shape
    probs = w.transpose(1, 2).reshape(b, h, nb * bl, k)[:, :, : out[0].shape[1]]
    return probs, {"window": bl, "global_keys": k - 3 * bl}


def _sampling_point(module: torch.nn.Module, out: tuple[Any, ...]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Deformable attention's (B, Q, H, levels, points) or (B, Q, H, Σ points) weights as (B, H, Q, Σ points)."""
    w = out[1]
    b, q, h = w.shape[:3]
    points = getattr(module, "num_points_list", None) or getattr(module, "n_points_list", None)
    if not points:
        points = [int(module.n_points)] * int(module.n_levels)
    return w.reshape(b, q, h, -1).transpose(1, 2), {"points": tuple(int(p) for p in points)}


def _additive(module: torch.nn.Module, out: tuple[Any, ...]) -> tuple[torch.Tensor, dict[str, Any]]:
    """SLANet's (B, 1, L) weights of one decoder state as (B, 1 head, 1 query, L)."""
    return out[1].unsqueeze(1), {}


# Read-only layouts: (how to read the module's returned weights, whether it must be asked for them and how
# many outputs it returns when not asked (None: it always returns them), whether its first output is the
# attention before the output projection).
_READERS: dict[str, tuple[Callable[..., tuple[torch.Tensor, dict[str, Any]]], int | None, bool]] = {
    "banded": (_banded, 1, True),
    "block_sparse": (_block_sparse, None, True),
    "block_local": (_block_local, 2, False),
    "sampling_point": (_sampling_point, None, False),
    "additive": (_additive, None, False),
}


_UNAVAILABLE = {"banded": frozenset({"query", "key", "value"}), "block_sparse": frozenset({"query", "key", "value"}),
                "block_local": frozenset({"query", "key", "value", "output"}),
                "sampling_point": frozenset({"query", "key", "value", "output"}),
                "additive": frozenset({"query", "key", "value", "output"})}  # fmt: skip


def _precomputed_forward(binding: SiteBinding, modality: str | None) -> Undo:
    """Shadow the forward of a module whose attention has no (Lq, Lk) scores to intercept but which returns
    its probabilities (asked with `output_attentions=True` where needed, which does not change its
    computation): hand them to the observers with the site's `probs_layout`, read-only."""
    module = binding.site.module
    if "forward" in vars(module):
        raise AttachError(f"site {binding.site.name!r} already has an instance-level forward; detach it first")
    original = module.forward
    sig = inspect.signature(original)
    layout_name = binding.site.probs_layout
    read, kept, heads_out = _READERS[layout_name]
    missing = frozenset({"query", "key", "value"} | (set() if heads_out else {"output"}))

    def forward(*args: Any, **kwargs: Any) -> Any:
        layer = binding.enter()
        if layer is None:
            return original(*args, **kwargs)
        asked = True
        if kept is not None:
            bound = sig.bind(*args, **kwargs)
            asked = bool(bound.arguments.get("output_attentions", False))
            bound.arguments["output_attentions"] = True
            args, kwargs = bound.args, bound.kwargs
        out = original(*args, **kwargs)
        probs, fields = read(module, out)
        b, h, length, k = probs.shape
        # (B, H, L, D): heads before the output projection (a width-0 stand-in where only the projection is returned)
        attn = out[0].view(b, length, h, -1).transpose(1, 2) if heads_out else probs.new_empty((b, h, length, 0))
        shape = {key: fields.pop(key) for key in ("window", "global_keys", "points") if key in fields}
        layout = replace(token_layout(binding.site.kind, modality, length, length), text=None, probs=layout_name,
                         **shape)  # fmt: skip
        call = run_call(binding, layer, KernelCall(
            query=probs.new_empty((b, h, length, 0)), key=probs.new_empty((b, h, k, 0)),
            value=probs.new_empty((b, h, k, attn.shape[-1])), attn_mask=None, scale=None, is_causal=False,
            enable_gqa=False, kernel_fn=_no_kernel(binding), native_fn=lambda: attn, precomputed_probs=probs,
            layout=layout, extra={"hand_written": True, **fields},
            make=partial(ManualCall, missing=missing,
                         where=f"site {binding.site.name!r} ({binding.site.module_class})"),
        ), result=False).call  # fmt: skip
        if call.edited:  # editors are refused at attach; an observer that edits anyway is not ignored
            raise EditError(f"site {binding.site.name!r}: {layout_name} probabilities are read-only")
        return out if asked else out[:kept]

    module.forward = forward

    def undo() -> None:
        if vars(module).get("forward") is forward:
            del module.forward

    return undo


def _no_kernel(binding: SiteBinding) -> Callable[..., torch.Tensor]:
    def kernel_fn(*_: Any) -> torch.Tensor:
        raise EditError(f"site {binding.site.name!r}: {binding.site.probs_layout} attention cannot be recomputed")

    return kernel_fn


# -- the adapter ----------------------------------------------------------------------------------
class HFManualAdapter(Adapter):
    """Traces transformers attention modules that compute the softmax by hand (see module docstring)."""

    name = "transformers-manual"

    def applies_to(self, model: torch.nn.Module) -> bool:
        return is_transformers_model(model)

    def __init__(self) -> None:
        self.modality: dict[str, str | None] = {}
        self._notice = SwitchNotice()

    def find_sites(self, model: torch.nn.Module) -> list[Site]:
        modules = dict(model.named_modules())
        found: list[tuple[str, torch.nn.Module, str]] = []
        attention_names: list[str] = []
        for name, module in model.named_modules():
            cls = type(module)
            ok, note = classify(cls)
            if ok and looks_like_attention(module):
                found.append((name, module, note))
                attention_names.append(name)
            elif calls_registry(cls) or calls_sdpa(cls):
                attention_names.append(name)
        sites = []
        for name, module, note in found:
            prefix = f"{name}." if name else ""
            if any(other.startswith(prefix) for other in attention_names if other != name):
                continue  # an inner module computes the attention
            sites.append(self._site(modules, name, module, note))
        return sites

    def _site(self, modules: dict[str, torch.nn.Module], name: str, module: torch.nn.Module, note: str) -> Site:
        """The site of one hand-written attention module (`note`: its class's refusal or layout note)."""
        note = note or _instance_refusal(module) or ""
        src = attention_source(type(module))
        unavailable = frozenset() if QK_RE.search(src) else frozenset({"query", "key"})
        heads = head_count(module)
        for needle, part in _PARTIAL:
            if not note and needle in src:
                note = f"hand-written attention, partly traced: {part}"
        kind = kind_by_name(name, module)
        self.modality[name] = token_modality(modules, "" if kind == "cross" else name)
        if not note and heads_unknown(module, heads, src):
            note, unavailable = HEADS_UNKNOWN, PER_HEAD
        layout = _PRECOMPUTED.get(note, "dense")
        return Site(
            name=name or type(module).__name__,
            kind=kind,
            module=module,
            adapter=self.name,
            processor_class="softmax (hand-written)",
            heads=heads,
            note=note or "hand-written attention: probs and output editable, q/k/v read-only",
            unavailable=_UNAVAILABLE.get(layout, unavailable),
            inputs_editable=False,
            probs_layout=layout,
        )

    def prepare(self, model: torch.nn.Module, bindings: list[SiteBinding]) -> Undo | None:
        for b in bindings:
            why = refusal_reason(b.site.module)
            if why:
                raise AttachError(
                    f"{type(model).__name__}: site {b.site.name!r} ({b.site.module_class}) cannot be traced: "
                    f"{why}; exclude it from the rule's match"
                )
        return None

    def install(self, binding: SiteBinding) -> Undo:
        # BigBird swaps its attention module inside forward for short inputs: follow it (`hf_switch`).
        return follow_switch(binding, self._install, partial(self._resite, binding.attachment.model), self._notice)

    def _install(self, binding: SiteBinding) -> Undo:
        if binding.site.probs_layout != "dense":
            return _precomputed_forward(binding, self.modality.get(binding.site.name))
        return shadow_forward(binding, head_count(binding.site.module), modality=self.modality.get(binding.site.name))

    def _resite(self, model: torch.nn.Module, site: Site, module: torch.nn.Module) -> Site:
        """The site `site` becomes when its module is replaced by `module` (refused: `traceable=False`)."""
        ok, note = classify(type(module))
        new = self._site(dict(model.named_modules()), site.name, module, note if ok else "")
        why = refusal_reason(module) if ok else f"{type(module).__name__} is not hand-written attention"
        return replace(new, traceable=False, note=why) if why else new
