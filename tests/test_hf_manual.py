"""Hand-written transformers attention (softmax inline): the `transformers-manual` fallback adapter.

For each tiny family: passive observers leave every output bit-identical, the traced probs equal the
model's own `output_attentions=True` tensors, head edits (of the output and of the probs) equal a
reference model whose value projection for that head is zeroed, and detach leaves no patch behind.
Families that cannot be traced are listed with a note and refused at attach.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from attntrace import Observer, Tracer
from attntrace.core.errors import AttachError, EditError, SelectionError
from attntrace.tracer import find_sites
from tests.hf_manual_models import FAMILIES, SMOKE, build

MANUAL = "transformers-manual"
# Sites to trace per family ("*" unless part of the model is refused).
MATCH = {"led": "decoder.*"}
HEAD = 1
# Attention maps the model returns from parts that are refused (LED's sliding-window encoder).
# SAM's `mask_decoder_attentions` are not probabilities: transformers records the two-way block's
# second output there, the (B, points, image tokens, hidden) key embeddings.
UNTRACED = {"led": "encoder_attentions", "sam": "mask_decoder_attentions"}


class Record(Observer):
    """Keeps a copy of every call's probs and the shapes of what it could read (grows per call)."""

    name = "record"
    needs = frozenset({"probs"})

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []

    def on_call(self, call) -> None:  # type: ignore[no-untyped-def]
        seen = {}
        for name in ("query", "key", "value", "output"):
            if name not in getattr(call, "missing", ()):
                seen[name] = getattr(call, name).detach().clone()
        self.calls.append({"site": call.site, "adapter": call.site_info.adapter, "probs": call.probs.clone(), **seen})


class ZeroHeadProbs(Observer):
    """Sets one head's probabilities to zero (so that head's output is zero). Keeps nothing."""

    name = "zero_head_probs"
    needs = frozenset({"probs"})
    edits = True

    def on_call(self, call) -> None:  # type: ignore[no-untyped-def]
        p = call.probs.clone()
        p[:, HEAD] = 0
        call.probs = p


class SameProbs(Observer):
    """Assigns the probabilities unchanged: forces the edit path. Keeps nothing."""

    name = "same_probs"
    needs = frozenset({"probs"})
    edits = True

    def on_call(self, call) -> None:  # type: ignore[no-untyped-def]
        call.probs = call.probs.clone()


def _tensors(out: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a (nested) model output, by path."""
    found: dict[str, torch.Tensor] = {}
    items = out.items() if hasattr(out, "items") else enumerate(out) if isinstance(out, (tuple, list)) else ()
    for k, v in items:
        if isinstance(v, torch.Tensor):
            found[f"{prefix}{k}"] = v
        elif v is not None and not isinstance(v, (str, int, float)):
            found.update(_tensors(v, f"{prefix}{k}."))
    return found


def _run(name: str, model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's outputs with attentions; for BLIP also its text decoder's (not part of the output)."""
    with torch.no_grad():
        out = _tensors(model(**inputs, output_attentions=True))
        if name == "blip":
            image = model.vision_model(inputs["pixel_values"])[0]
            text = model.text_decoder(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                encoder_hidden_states=image, output_attentions=True,
            )  # fmt: skip
            out.update(_tensors(text, "text."))
    return out


def _manual_sites(model: torch.nn.Module) -> list[Any]:
    return [s for s in find_sites(model) if s.adapter == MANUAL]


def _hooks(model: torch.nn.Module) -> list[tuple[int, ...]]:
    # transformers installs its own output-capturing hooks on the first `output_attentions` call.
    return [(*m._forward_hooks, *m._forward_pre_hooks) for m in model.modules()]


def _assert_restored(model: torch.nn.Module, hooks: list[tuple[int, ...]] | None = None) -> None:
    for m in model.modules():
        assert "forward" not in vars(m), type(m).__name__
    if hooks is not None:
        assert _hooks(model) == hooks
    else:
        assert not model._forward_hooks and not model._forward_pre_hooks


# -- transparency and probs ---------------------------------------------------------------------
@pytest.mark.parametrize("name", [*FAMILIES, *SMOKE])
def test_passive_trace_is_bit_identical_and_probs_equal_eager(name: str) -> None:
    model, inputs = build(name)
    manual = _manual_sites(model)
    assert manual, "the family has hand-written attention sites"
    reference = _run(name, model, inputs)
    hooks = _hooks(model)
    tracer = Tracer()
    rec = tracer.add(Record(), match=MATCH.get(name, "*"))
    with tracer.attach(model):
        traced = _run(name, model, inputs)
    _assert_restored(model, hooks)
    assert reference.keys() == traced.keys()
    for key, ref in reference.items():
        assert torch.equal(ref, traced[key]), key  # bit-identical, attentions included

    traced_sites = {c["site"] for c in rec.calls}
    expected = {s.name for s in manual if not s.note.startswith(("sliding", "block"))}
    assert expected <= traced_sites
    # Every attention tensor the model returns is one of the traced probability maps.
    oracle = {k: v for k, v in reference.items() if "attentions" in k and not k.startswith(UNTRACED.get(name, "-"))}
    if name == "squeezebert":  # SqueezeBERT returns the scores before its softmax as "attentions"
        oracle = {k: v.softmax(-1) for k, v in oracle.items()}
    assert oracle
    for key, att in oracle.items():
        hits = [
            c for c in rec.calls
            if c["probs"].numel() == att.numel()
            and torch.allclose(c["probs"].reshape(att.shape), att.float(), atol=1e-5, rtol=0)
        ]  # fmt: skip
        assert hits, f"{name}: no traced probs equal {key} {tuple(att.shape)}"
    # Where q/k/v/output were found, they are consistent with the probs: output = probs @ value,
    # and for plain dot-product scores softmax(q·kᵀ·s) reproduces the probs for some scale s.
    for c in rec.calls:
        if c["adapter"] != MANUAL or "value" not in c:
            continue
        assert torch.allclose(c["probs"] @ c["value"].float(), c["output"].float(), atol=1e-5), c["site"]
        assert c["probs"].shape[:3] == c["output"].shape[:3]


def test_query_key_are_the_score_operands() -> None:
    # GPT-Neo: scores = q·kᵀ (no scaling), causal mask and padding: probs = softmax(q·kᵀ + mask).
    model, inputs = build("gpt_neo")
    tracer = Tracer()
    rec = tracer.add(Record())
    with tracer.attach(model), torch.no_grad():
        model(**inputs)
    assert {c["site"] for c in rec.calls} == {"h.0.attn.attention", "h.1.attn.attention"}
    for c in rec.calls:
        if c["site"] != "h.0.attn.attention":
            continue  # layer 1 is local (sliding-window mask)
        scores = c["query"].float() @ c["key"].float().transpose(-1, -2)
        lq = scores.shape[-1]
        causal = torch.ones(lq, lq, dtype=torch.bool).tril()
        pad = inputs["attention_mask"].bool()[:, None, None, :]
        expected = scores.masked_fill(~(causal & pad), torch.finfo(scores.dtype).min).softmax(-1)
        assert torch.allclose(c["probs"], expected, atol=1e-5)


# -- edits --------------------------------------------------------------------------------------
def _zero_value_head(name: str, site_module: torch.nn.Module, heads: int) -> None:
    """Zero the value projection of head `HEAD` at one site: that head's attention output becomes 0."""
    with torch.no_grad():
        if name == "xlnet":
            site_module.v[:, HEAD] = 0
            return
        if name in ("bloom", "falcon_alibi"):
            lin = site_module.query_key_value
            d = lin.out_features // (3 * heads)
            rows = slice(HEAD * 3 * d + 2 * d, HEAD * 3 * d + 3 * d)  # (heads, 3, d) layout
        elif name in ("sam_vision", "sam", "blip") and hasattr(site_module, "qkv"):
            lin = site_module.qkv
            e = lin.out_features // 3
            d = e // heads
            rows = slice(2 * e + HEAD * d, 2 * e + (HEAD + 1) * d)  # (3, heads, d) layout
        else:
            lin = next(
                getattr(site_module, a) for a in ("v_proj", "value_proj", "value", "v") if hasattr(site_module, a)
            )
            d = getattr(lin, "out_features", None) or lin.out_channels  # SqueezeBERT: 1x1 convolutions
            d //= heads
            rows = slice(HEAD * d, (HEAD + 1) * d)
        lin.weight[rows] = 0
        if lin.bias is not None:
            lin.bias[rows] = 0


ABLATABLE = [n for n in FAMILIES if n != "falcon"]  # falcon: one value head shared by all (multi-query)


@pytest.mark.parametrize("name", ABLATABLE)
def test_head_edits_equal_zeroed_value_reference(name: str) -> None:
    # Ablating one head's output, or zeroing its probabilities, gives what a model whose value
    # projection for that head is zero computes (an independent reference: no tracer involved).
    model, inputs = build(name)
    reference_model = copy.deepcopy(model)
    sites = [s for s in _manual_sites(model) if not s.note.startswith(("sliding", "block"))]
    ref_sites = {s.name: s for s in _manual_sites(reference_model)}
    for s in sites:
        _zero_value_head(name, ref_sites[s.name].module, s.heads)
    expected = _run(name, reference_model, inputs)
    plain = _run(name, model, inputs)
    hooks = _hooks(model)
    outputs = [k for k in expected if "attentions" not in k]
    assert any(not torch.allclose(plain[k], expected[k], atol=1e-4) for k in outputs)  # the edit matters
    for editor in ("ablate", ZeroHeadProbs()):
        tracer = Tracer()
        if editor == "ablate":
            tracer.add("ablate", match=[s.name for s in sites], heads=[HEAD])
        else:
            tracer.add(editor, match=[s.name for s in sites])
        with tracer.attach(model):
            got = _run(name, model, inputs)
        _assert_restored(model, hooks)
        for key in outputs:  # the returned attention maps are the model's own, before the edit
            assert torch.allclose(got[key], expected[key], atol=2e-5, rtol=1e-4), (editor, key)


@pytest.mark.parametrize("name", ["falcon", "bloom", "sam_vision", "xlnet", "deberta_v2"])
def test_unchanged_probs_through_the_edit_path_match_native(name: str) -> None:
    model, inputs = build(name)
    plain = _run(name, model, inputs)
    tracer = Tracer()
    tracer.add(SameProbs(), match=MATCH.get(name, "*"))
    with tracer.attach(model):
        got = _run(name, model, inputs)
    for key, ref in plain.items():
        assert torch.allclose(got[key], ref, atol=1e-5), key


# -- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "model_class", "why"),
    [
        # Sliding-window and block-sparse sites are traced read-only: an observer wanting dense probs is refused.
        ("longformer", "LongformerSelfAttention", "sliding-window"),
        ("led", "LEDEncoderSelfAttention", "sliding-window"),
        ("reformer", "LocalSelfAttention", "chunked local attention"),
        ("bigbird_pegasus_sparse", "BigBirdPegasusBlockSparseAttention", "block-sparse"),
    ],
)
def test_untraceable_attention_is_listed_and_refused_at_attach(name: str, model_class: str, why: str) -> None:
    model, inputs = build(name)
    refused = [s for s in _manual_sites(model) if why in s.note]
    assert refused, "listed by `attntrace sites` with a note"
    tracer = Tracer()
    tracer.add(Record())
    with pytest.raises((AttachError, SelectionError), match=model_class) as err:
        tracer.attach(model)
    assert why in str(err.value) and refused[0].name in str(err.value)
    _assert_restored(model)
    assert tracer.attachment is None


def test_input_editors_and_missing_tensors_are_refused_at_attach() -> None:
    model, _ = build("gpt_neo")
    with pytest.raises(SelectionError, match="cannot apply edits of"):
        _attach(model, "temperature", tau=0.5)
    _assert_restored(model)
    model, _ = build("xlnet")  # scores are a sum of einsums: no single q·kᵀ product to show
    sites = _manual_sites(model)
    assert sites and all(s.unavailable == {"query", "key"} for s in sites)
    with pytest.raises(SelectionError, match=r"\['query'\].*cannot provide"):
        _attach(model, "save", tensors=["query"])
    _assert_restored(model)


def _attach(model: torch.nn.Module, observer: str, **params: Any) -> None:
    tracer = Tracer()
    tracer.add(observer, **params)
    tracer.attach(model)


def test_an_edit_of_query_at_call_time_is_an_edit_error() -> None:
    # An observer that does not declare what it edits still cannot edit hand-written scores' inputs.
    class Sneaky(Observer):
        needs = frozenset({"probs"})

        def on_call(self, call) -> None:  # type: ignore[no-untyped-def]
            call.query = call.query * 2

    model, inputs = build("mpnet")
    tracer = Tracer()
    tracer.add(Sneaky())
    with pytest.raises(EditError, match="cannot be edited"), tracer.attach(model), torch.no_grad():
        model(**inputs)
    _assert_restored(model)


@pytest.mark.parametrize("name", ["bigbird_pegasus", "sam"])
def test_composite_model_gets_both_adapters(name: str) -> None:
    # BigBird-Pegasus (full attention): hand-written encoder, registry decoder; SAM: hand-written
    # vision encoder, registry mask decoder. One attachment drives both adapters.
    model, inputs = build(name)
    adapters = {s.adapter for s in find_sites(model)}
    assert adapters == {"transformers", MANUAL}
    tracer = Tracer()
    rec = tracer.add(Record())
    with tracer.attach(model), torch.no_grad():
        model(**inputs)
    assert {c["adapter"] for c in rec.calls} == adapters
    _assert_restored(model)
    assert model.config._attn_implementation == "eager"


def test_sdpa_branch_of_a_hand_written_module_is_caught_at_the_same_site() -> None:
    # Falcon's attention module runs F.sdpa under attn_implementation="sdpa" and its own softmax under
    # "eager": one site either way, probs equal to eager's attentions.
    model, inputs = build("falcon")
    with torch.no_grad():
        eager = model(**inputs, output_attentions=True).attentions
    model.config._attn_implementation_internal = "sdpa"  # the tiny config was built for eager
    tracer = Tracer()
    rec = tracer.add(Record())
    with tracer.attach(model), torch.no_grad():
        model(**inputs)
    assert [c["site"] for c in rec.calls] == ["h.0.self_attention", "h.1.self_attention"]
    for c, att in zip(rec.calls, eager, strict=True):
        assert torch.allclose(c["probs"], att, atol=1e-6)
    _assert_restored(model)


def test_deformable_attention_is_classified_as_sampling_point() -> None:
    from transformers.models.deformable_detr import modeling_deformable_detr as dd

    from attntrace.adapters.hf_manual import SAMPLING_POINT, classify

    ok, note = classify(dd.DeformableDetrMultiscaleDeformableAttention)
    # traced read-only (tests/test_transformers_deformable.py)
    assert ok and note == SAMPLING_POINT and "sampling points" in note
    # Its registry-based self-attention in the same model is not claimed by this adapter.
    assert classify(dd.DeformableDetrSelfAttention) == (False, "")


def test_cli_sites_lists_refused_attention_with_its_note(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from attntrace.cli import main

    model, _ = build("led")
    model.save_pretrained(tmp_path)
    assert main(["sites", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if "longformer_self_attn" in line)
    assert "LEDEncoderSelfAttention" in row and "sliding-window" in row
    decoder = next(line for line in table.splitlines() if "decoder.layers.0.encoder_attn" in line)
    assert "cross" in decoder and "hand-written attention" in decoder


def test_3d_scores_with_unknown_head_count_are_listed_and_refused() -> None:
    # DeBERTa-v2 multiplies (B·H, L, D) tensors with bmm; without a head count the (B·H, Lq, Lk) map
    # cannot be split into heads: listed with a note, probs observers refused (not reported as 1 head).
    model, _ = build("deberta_v2")
    sites = _manual_sites(model)
    assert sites and all(s.heads == 4 and not s.unavailable for s in sites)
    for s in sites:
        del s.module.num_attention_heads
    sites = _manual_sites(model)
    assert all(s.heads is None and "head count unknown" in s.note and "probs" in s.unavailable for s in sites)
    with pytest.raises(SelectionError, match=r"\['probs'\].*cannot provide.*head count unknown"):
        _attach(model, "stats")
    _assert_restored(model)


@pytest.mark.parametrize(
    ("module", "cls", "why"),
    [
        ("swiftformer.modeling_swiftformer", "SwiftFormerEfficientAdditiveAttention", "additive attention"),
        ("groupvit.modeling_groupvit", "GroupViTAssignAttention", "slot assignment"),
    ],
)
def test_softmax_not_over_keys_is_classified_as_refused(module: str, cls: str, why: str) -> None:
    # Softmaxes over a (B, L, 1) score vector or over the query axis are not an (Lq, Lk) probability matrix:
    # listed with the reason, refused at attach (not crashing mid-call). LongT5's block-local attention is
    # traced read-only (tests/test_transformers_block_sparse.py), and so is SLANet's additive attention, which
    # returns its weights (tests/test_transformers_deformable.py).
    import importlib

    from attntrace.adapters.hf_manual import classify

    ok, note = classify(getattr(importlib.import_module(f"transformers.models.{module}"), cls))
    assert ok and why in note


def test_windowed_5d_scores_fold_windows_into_heads() -> None:
    # Hiera's mask-unit attention: scores (B, H, windows, Lq, Lk) = q @ kᵀ; probs are (B, H·windows, Lq,
    # Lk) and equal what the module returns with output_attentions, flattened the same way.
    import transformers

    from tests import coverage_transformers as ct

    torch.manual_seed(0)
    cfg = transformers.HieraConfig(image_size=[64, 64], embed_dim=8, depths=[1, 1], num_heads=[2, 2],
                                   masked_unit_size=[8, 8], query_stride=[2, 2], masked_unit_attention=[True, False],
                                   num_query_pool=1, mlp_ratio=1.0, attn_implementation="eager")  # fmt: skip
    model = transformers.HieraModel(cfg).eval()
    inputs = {"pixel_values": torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))}
    sites = _manual_sites(model)
    attn = next(s for s in sites if s.name == "encoder.stages.0.layers.0.attn")
    returned: list[torch.Tensor] = []
    hook = attn.module.register_forward_hook(lambda m, a, out: returned.append(out[1]))
    base = ct.run(model, inputs, output_attentions=True).last_hidden_state
    hook.remove()
    ref = returned[0]
    assert ref.dim() == 5 and ref.shape[2] > 1, "mask units in use"
    tracer = Tracer()
    rec = tracer.add(Record(), match=attn.name)
    with tracer.attach(model):
        out = ct.run(model, inputs).last_hidden_state
    assert torch.equal(out, base)
    call = rec.calls[0]
    probs = call["probs"]
    assert torch.allclose(probs @ call["value"].float(), call["output"].float(), atol=1e-6)
    assert probs.shape == ref.flatten(1, 2).shape
    assert torch.allclose(probs, ref.flatten(1, 2).float(), atol=1e-6)
