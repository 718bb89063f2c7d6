"""Transformers attention written by hand (softmax inline, no attention registry): which classes, and refusals.

In transformers 5.24, 112 families (79 entirely, 33 next to registry attention) have attention
classes that compute `softmax(q·kᵀ + bias) @ v` in the module's own `forward` instead of calling
`ALL_ATTENTION_FUNCTIONS` (DeBERTa, BLOOM, Falcon eager, GPT-Neo, MPNet, XLNet, BLIP, LED's decoder,
SAM's vision encoder, BigBird-Pegasus' full encoder attention...; `benchmarks/hf_manual_census.md`).

Sites: modules of a `PreTrainedModel` whose `forward` (or a `self.method` it calls) contains a softmax
and a matrix product and does not use the registry; a module is not a site when one of its
descendants is an attention module (the innermost one computes the attention). Interception is the
shared hand-written engine (`attntrace.tracing.handwritten`).

Where there is no (Lq, Lk) matrix to intercept but the module returns its weights (sliding-window,
block-sparse, block-local, Reformer's chunked and LSH, deformable, additive attention), the site is traced
read-only in the layout the module's weights have (`attntrace.adapters.hf_readonly`, `Layout.probs`).
BigBird swaps its block-sparse modules for full attention inside `forward` on short inputs: the tracer follows
the swap onto the new module (`attntrace.adapters.hf_switch`).

What cannot be traced is listed with a note and refused at attach: LSH attention with several hash rounds
(Reformer, `num_hashes` > 1), deformable attention that does not return its weights, and I-BERT built with
`quant_mode=True` (an integer approximation of the softmax; with `quant_mode=False` it is traced). `query`,
`key`, `value` and the mask cannot be edited at hand-written sites (the scores are not rebuilt from them);
observers that edit them are refused at attach.
"""

from __future__ import annotations

import re
from dataclasses import replace
from functools import partial

import torch

from ..core.errors import AttachError
from ..core.site import Site
from ..tracing.binding import SiteBinding
from ..tracing.handwritten import HEADS_UNKNOWN, PER_HEAD, heads_unknown, shadow_forward
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
from .hf_readonly import (
    ADDITIVE,
    BANDED,
    BLOCK_CONTEXT,
    BLOCK_LOCAL,
    BLOCK_SPARSE,
    CHUNKED,
    LAYOUT_OF,
    LSH,
    SAMPLING_POINT,
    UNAVAILABLE,
    readonly_forward,
)
from .hf_switch import SwitchNotice, follow_switch

__all__ = [
    "ADDITIVE",
    "BANDED",
    "BLOCK_SPARSE",
    "SAMPLING_POINT",
    "HFManualAdapter",
    "attention_source",
    "classify",
    "refusal_reason",
]  # the notes re-exported from `hf_readonly`

_BANDED_NEEDLE = "_sliding_chunks"

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
_LSH_ROUNDS = (
    "LSH attention with num_hashes={} (Reformer): each hash round's output is normalised by a logsumexp the "
    "module does not return and the rounds are mixed by them, so the weight each key receives is not known; "
    "build or call the model with num_hashes=1 to trace it"
)
_CONTEXT_OFFSET = (
    "chunked local attention whose context window starts {} frames back with blocks of {} (Gemma 3n audio, "
    "conf_attention_context_left - 1 != conf_attention_chunk_size): the block-local layout (windows starting one "
    "block back) does not describe it"
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
    if cls.__name__.endswith("Indexer") and "topk(" in src:
        # A sparse-attention indexer (DeepSeek DSA and its kin) picks the keys a sibling attention module
        # attends to: it returns top-k indices, not weights. GLM-5-Next's has a softmax, but over the tokens
        # of each key pool with a learned per-channel gate (no query), so it is not attention either.
        return False, ""
    if SOFTMAX_RE.search(src) and ("grid_sample" in src or "sampling_locations" in src):
        # the module returns its softmax over sampling points (all transformers 5.24 members do)
        return True, SAMPLING_POINT if _RETURNS_WEIGHTS_RE.search(src) else _DEFORMABLE
    if not PRODUCT_RE.search(src):
        return False, ""
    if not SOFTMAX_RE.search(src):
        if "logsumexp(" in src and "_look_adjacent(" in src and "output_attentions" in src:
            return True, LSH if "_hash_vectors(" in src else CHUNKED
        if "logsumexp(" in src:
            return True, _LOGSUMEXP
        return False, ""
    if "_extract_block_context(" in src:
        return True, BLOCK_CONTEXT
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
    if note == LSH and int(getattr(module, "num_hashes", 1) or 1) > 1:
        return _LSH_ROUNDS.format(int(module.num_hashes))
    if note == BLOCK_CONTEXT and int(module.max_past_horizon) != int(module.chunk_size):
        return _CONTEXT_OFFSET.format(int(module.max_past_horizon), int(module.chunk_size))
    if note in LAYOUT_OF:
        return None
    return (note or _instance_refusal(module)) if ok else None


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
        layout = LAYOUT_OF.get(note, "dense")
        return Site(
            name=name or type(module).__name__,
            kind=kind,
            module=module,
            adapter=self.name,
            processor_class="softmax (hand-written)",
            heads=heads,
            note=note or "hand-written attention: probs and output editable, q/k/v read-only",
            unavailable=UNAVAILABLE.get(note, unavailable),
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
            return readonly_forward(binding, self.modality.get(binding.site.name))
        return shadow_forward(binding, head_count(binding.site.module), modality=self.modality.get(binding.site.name))

    def _resite(self, model: torch.nn.Module, site: Site, module: torch.nn.Module) -> Site:
        """The site `site` becomes when its module is replaced by `module` (refused: `traceable=False`)."""
        ok, note = classify(type(module))
        new = self._site(dict(model.named_modules()), site.name, module, note if ok else "")
        why = refusal_reason(module) if ok else f"{type(module).__name__} is not hand-written attention"
        return replace(new, traceable=False, note=why) if why else new
