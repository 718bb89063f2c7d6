"""Multi-scale deformable attention (the DETR family) traced read-only with `probs_layout="sampling_point"`.

Each query's softmax runs over its own sampling points (`points[l]` per feature level), bilinearly sampled
at data-dependent locations: the traced probs are the (B, Q, H, levels, points) weights the module returns,
as (B, H, Q, Σ points). Checked against the definition (softmax of the module's own `attention_weights`
projection), against the module's own output (the value map sampled at the locations the definition gives,
weighted by the traced probs, then projected) and against what the module returns; across the family
through the shared module classes (Deformable DETR, RT-DETR v2, D-FINE, Mask2Former's pixel decoder,
Grounding DINO).
"""

from __future__ import annotations

import importlib
import inspect
import json
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attntrace import Observer, Tracer, find_sites  # noqa: E402
from attntrace.core.call import AttentionCall  # noqa: E402
from attntrace.core.errors import SelectionError  # noqa: E402
from tests import coverage_transformers as ct  # noqa: E402
from tests.test_transformers_block_sparse import Sparse  # noqa: E402


class Points(Sparse):
    """Passive: keeps every call's probs and layout (`calls`)."""

    probs_layouts = frozenset({"dense", "sampling_point"})


def _detr() -> torch.nn.Module:
    backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1],
                                         out_features=["stage3", "stage4"])  # fmt: skip
    cfg = transformers.DeformableDetrConfig(
        use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=32,
        encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5, num_feature_levels=2, encoder_n_points=2,
        decoder_n_points=3,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.DeformableDetrModel(cfg).eval()


NAMES = ["encoder.layers.0.self_attn", "decoder.layers.0.encoder_attn"]


def _pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _patched(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if "forward" in vars(m)]


def _reconstruct(att: torch.nn.Module, kw: dict[str, Any], probs: torch.Tensor) -> torch.Tensor:
    """The module's output rebuilt from `probs` (B, H, Q, levels·points): the value map bilinearly sampled at
    the locations the definition gives (reference point + offset / level size), weighted, projected."""
    from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention

    hidden = kw["hidden_states"] + kw["position_embeddings"]
    enc = kw["encoder_hidden_states"]
    b, q, _ = hidden.shape
    h, lv, pt = att.n_heads, att.n_levels, att.n_points
    value = att.value_proj(enc)
    if kw.get("attention_mask") is not None:
        value = value.masked_fill(~kw["attention_mask"][..., None], 0.0)
    value = value.view(b, enc.shape[1], h, -1)
    offsets = att.sampling_offsets(hidden).view(b, q, h, lv, pt, 2)
    shapes = kw["spatial_shapes"]
    locations = kw["reference_points"][:, :, None, :, None, :] + offsets / shapes.flip(-1)[None, None, None, :, None, :]
    weights = probs.transpose(1, 2).reshape(b, q, h, lv, pt)
    out = MultiScaleDeformableAttention()(value, shapes, kw["spatial_shapes_list"], kw["level_start_index"],
                                          locations, weights, att.im2col_step)  # fmt: skip
    return att.output_proj(out)


def test_deformable_detr_probs_equal_definition_output_and_returned_weights() -> None:
    torch.set_num_threads(1)
    model = _detr()
    x = _pixels()
    sites = {s.name: s for s in find_sites(model)}
    assert all(sites[n].probs_layout == "sampling_point" and sites[n].traceable for n in NAMES)
    assert sites[NAMES[0]].kind == "self" and sites[NAMES[1]].kind == "cross"
    seen: dict[str, tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor]]] = {}

    def keep(name: str) -> Any:
        def hook(_: torch.nn.Module, args: Any, kw: dict[str, Any], out: Any) -> None:
            seen.setdefault(name, (kw, out))

        return hook

    hooks = [model.get_submodule(n).register_forward_hook(keep(n), with_kwargs=True) for n in NAMES]
    with torch.no_grad():
        plain = model(pixel_values=x)
        asked = model(pixel_values=x, output_attentions=True)
    for hook in hooks:
        hook.remove()
    tracer = Tracer()
    obs = tracer.add(Points())
    with torch.no_grad(), tracer.attach(model):
        traced = model(pixel_values=x)
        traced_asked = model(pixel_values=x, output_attentions=True)
    assert ct.outputs_equal(plain, traced) and ct.outputs_equal(asked, traced_asked)
    assert _patched(model) == []
    calls = [c for c in obs.calls if c[0] in NAMES]
    assert [s for s, _, _ in calls] == NAMES * 2
    for (name, probs, layout), points in zip(calls[:2], ((2, 2), (3, 3))):
        kw, (output, returned) = seen[name]
        att = model.get_submodule(name)
        b, q = kw["hidden_states"].shape[:2]
        assert (layout.probs, layout.points, layout.levels) == ("sampling_point", points, 2)
        assert probs.shape == (b, 4, q, sum(points))
        # what the module returns, and the output_attentions the model gives
        assert torch.equal(probs, returned.reshape(b, q, 4, -1).transpose(1, 2))
        eager = asked.encoder_attentions[0] if name.startswith("encoder") else asked.cross_attentions[0]
        assert torch.equal(probs, eager.reshape(b, q, 4, -1).transpose(1, 2))
        with torch.no_grad():
            logits = att.attention_weights(kw["hidden_states"] + kw["position_embeddings"]).view(b, q, 4, -1)
            assert float((probs - logits.softmax(-1).transpose(1, 2)).abs().max()) <= 1e-6
            assert float((_reconstruct(att, kw, probs) - output).abs().max()) <= 1e-5
        assert float((probs.sum(-1) - 1).abs().max()) <= 1e-5


def test_stats_and_save_read_sampling_points_dense_observers_and_editors_are_refused(tmp_path: Any) -> None:
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    model = _detr()
    x = _pixels()
    tracer = Tracer(output_dir=tmp_path)
    obs = tracer.add(Points(), match=NAMES)
    stats = tracer.add("stats", match=NAMES, metrics=["entropy", "max"])
    tracer.add("save", match=NAMES, dtype="float32")
    with torch.no_grad(), tracer.attach(model):
        model(pixel_values=x)
    rows = [r for r in stats.result() if r["site"] == NAMES[1] and r["batch"] == 1]
    tracer.close()
    p = obs.calls[1][1][1]  # the decoder's cross-attention, batch item 1: (H, Q, 6)
    entropy = -(p.clamp_min(1e-30).log() * p).sum(-1).mean(-1)
    assert {r["metric"] for r in rows} == {"entropy", "max"} and len(rows) == 8
    for r in rows:
        expected = entropy[r["head"]] if r["metric"] == "entropy" else p.amax(-1).mean(-1)[r["head"]]
        assert abs(r["value"] - float(expected)) <= 1e-5
    manifest = json.loads(next(tmp_path.rglob("manifest.json")).read_text())
    entry = next(e for e in manifest["entries"] if e["site"] == NAMES[1])
    assert (entry["probs_layout"], entry["levels"], entry["points"]) == ("sampling_point", 2, [3, 3])
    saved = load_file(str(next(tmp_path.rglob(entry["file"]))))[entry["key"]]
    assert torch.equal(saved, obs.calls[1][1])
    for observer, params in (("heatmap", {}), ("ablate", {"heads": [0]})):
        t = Tracer()
        t.add(observer, match=NAMES, **params)
        with pytest.raises(SelectionError, match=rf"'{observer}' needs a dense .* sampling_point probabilities"):
            t.attach(model)
        assert _patched(model) == []


# Built by the coverage sweep's builder (tests/coverage_transformers.py): the family's module classes with
# their own kernels (transformers' `MultiScaleDeformableAttention` module, `multi_scale_deformable_attention`
# functions v1/v2, per-level point counts, no output projection in D-FINE).
FAMILY = {"rt_detr_v2": "RTDetrV2", "d_fine": "DFine", "mask2former": "Mask2Former", "grounding-dino": "GroundingDino"}


def _build(model_type: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The sweep's tiny model of one family (its shrinker and overrides), without listing every family."""
    config_cls = getattr(transformers, f"{FAMILY[model_type]}Config")
    kw = ct.shrink(config_cls, config_cls())
    kw.update(ct.OVERRIDES.get(model_type, {}))
    torch.manual_seed(0)
    model_cls = getattr(transformers, f"{FAMILY[model_type]}Model")
    model = model_cls._from_config(config_cls(**kw), attn_implementation="eager")
    return model.eval(), ct.make_inputs(model)


@pytest.mark.parametrize("model_type", FAMILY)
def test_family_sampling_point_probs_equal_the_returned_weights(model_type: str) -> None:
    torch.set_num_threads(1)
    model, inputs = _build(model_type)
    names = [s.name for s in find_sites(model) if s.probs_layout == "sampling_point"]
    assert names and all(s.traceable for s in find_sites(model) if s.name in names)
    returned: dict[str, list[torch.Tensor]] = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: returned.setdefault(n, []).append(out[1]) and None) for n in names]  # fmt: skip
    with torch.no_grad():
        plain = ct.all_tensors(ct.run(model, inputs))
    for hook in hooks:
        hook.remove()
    tracer = Tracer()
    obs = tracer.add(Points(), match=names)
    with torch.no_grad(), tracer.attach(model):
        traced = ct.all_tensors(ct.run(model, inputs))
    assert len(plain) == len(traced) and all(torch.equal(a, b) for a, b in zip(plain, traced))
    assert _patched(model) == []
    assert sorted({s for s, _, _ in obs.calls}) == sorted(returned)
    got: dict[str, list[torch.Tensor]] = {}
    for site, probs, layout in obs.calls:
        got.setdefault(site, []).append(probs)
        assert layout.probs == "sampling_point" and probs.shape[-1] == sum(layout.points)
    for name, weights in returned.items():
        for probs, w in zip(got[name], weights, strict=True):
            assert torch.equal(probs, w.reshape(*w.shape[:3], -1).transpose(1, 2))
            assert float((probs.sum(-1) - 1).abs().max()) <= 1e-5


class QK(Observer):
    needs = frozenset({"query", "key", "probs"})

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def on_call(self, call: AttentionCall) -> None:
        self.calls.append((call.query.clone(), call.key.clone(), call.probs.clone()))


def test_grounding_dino_bidirectional_attention_gives_both_halves_query_and_key() -> None:
    """Grounding DINO's fusion layer takes one product S = q_img·k_txtᵀ and two softmaxes: over S (image to
    text) and over Sᵀ (text to image, whose queries are the text keys and keys the image queries)."""
    torch.set_num_threads(1)
    model, inputs = _build("grounding-dino")
    name = "encoder.layers.0.fusion_layer.attn"
    tracer = Tracer()
    obs = tracer.add(QK(), match=[name])
    with torch.no_grad(), tracer.attach(model):
        ct.run(model, inputs)
    assert len(obs.calls) == 2
    lq = {c[2].shape[-2] for c in obs.calls}
    assert len(lq) == 2  # an image-to-text and a text-to-image call
    for q, k, probs in obs.calls:
        assert q.shape[-2] == probs.shape[-2] and k.shape[-2] == probs.shape[-1]
        scores = (q @ k.transpose(-1, -2)).masked_fill(probs == 0, float("-inf"))  # padded keys: masked
        assert float((scores.softmax(-1) - probs).abs().max()) <= 1e-5
    (qa, ka, _), (qb, kb, _) = obs.calls
    assert torch.equal(qa, kb) and torch.equal(ka, qb)  # the same two projections, swapped


# Every multi-scale deformable attention class of the installed transformers (including members the sweep
# cannot build: OmDet-Turbo, LW-DETR, OneFormer, PP-DocLayout) is traced with the sampling-point layout.
DEFORMABLE_CLASSES = {
    "deformable_detr": "DeformableDetrMultiscaleDeformableAttention", "rt_detr": "RTDetrMultiscaleDeformableAttention",
    "rt_detr_v2": "RTDetrV2MultiscaleDeformableAttention", "d_fine": "DFineMultiscaleDeformableAttention",
    "deimv2": "Deimv2MultiscaleDeformableAttention", "grounding_dino": "GroundingDinoMultiscaleDeformableAttention",
    "mm_grounding_dino": "MMGroundingDinoMultiscaleDeformableAttention",
    "omdet_turbo": "OmDetTurboMultiscaleDeformableAttention", "lw_detr": "LwDetrMultiscaleDeformableAttention",
    "rf_detr": "RfDetrMultiscaleDeformableAttention",
    "mask2former": "Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention",
    "oneformer": "OneFormerPixelDecoderEncoderMultiscaleDeformableAttention",
    "pp_doclayout_v2": "PPDocLayoutV2MultiscaleDeformableAttention",
    "pp_doclayout_v3": "PPDocLayoutV3MultiscaleDeformableAttention",
    "pp_doclayout_v4": "PPDocLayoutV4MultiscaleDeformableAttention",
}  # fmt: skip


def test_every_deformable_class_is_classified_sampling_point() -> None:
    from attntrace.adapters.hf_manual import SAMPLING_POINT, classify

    found = {}
    for family in DEFORMABLE_CLASSES:
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            own = cls.__module__ == module.__name__ and issubclass(cls, torch.nn.Module)
            if own and classify(cls)[1] == SAMPLING_POINT:
                found[family] = cls_name
    assert found == DEFORMABLE_CLASSES


# -- SLANet: additive (Bahdanau) attention, read-only with probs_layout="additive" ---------------------------
def test_slanet_additive_probs_equal_definition_and_drive_the_recurrent_state() -> None:
    torch.set_num_threads(1)
    cfg = transformers.SLANetConfig(**ct.shrink(transformers.SLANetConfig, transformers.SLANetConfig()))
    cfg.max_text_length = 3  # the head runs its attention cell max_text_length + 1 times per forward
    torch.manual_seed(0)
    model = transformers.SLANetForTableRecognition(cfg).eval()
    x = _pixels()
    name = "head.structure_attention_cell"
    cell = model.get_submodule(name)
    site = next(s for s in find_sites(model) if s.name == name)
    assert (site.probs_layout, site.traceable) == ("additive", True)
    seen: list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, torch.Tensor]]] = []
    hook = cell.register_forward_hook(lambda m, a, out: seen.append((a, out)) and None)
    with torch.no_grad():
        plain = ct.all_tensors(model(pixel_values=x))
    hook.remove()
    tracer = Tracer()
    obs = tracer.add(Points(), match=[name])
    obs.probs_layouts = frozenset({"additive"})  # type: ignore[misc]
    stats = tracer.add("stats", match=[name], metrics=["entropy"])
    with torch.no_grad(), tracer.attach(model):
        traced = ct.all_tensors(model(pixel_values=x))
    assert len(plain) == len(traced) and all(torch.equal(a, b) for a, b in zip(plain, traced))
    assert _patched(model) == [] and len(obs.calls) == len(seen) == 4
    for (_, probs, layout), ((prev, hidden, onehot), (state, weights)) in zip(obs.calls, seen):
        assert layout.probs == "additive" and probs.shape == (2, 1, 1, hidden.shape[1])
        assert torch.equal(probs, weights.unsqueeze(1))
        with torch.no_grad():
            scores = cell.score(torch.tanh(cell.input_to_hidden(hidden) + cell.hidden_to_hidden(prev)[:, None]))
            assert float((probs[:, 0, 0] - scores[..., 0].softmax(-1)).abs().max()) <= 1e-6
            context = (probs[:, 0] @ hidden)[:, 0]  # the weighted tokens are what the GRU reads
            assert float((cell.rnn(torch.cat([context, onehot], 1), prev) - state).abs().max()) <= 1e-5
    p = obs.calls[0][1][1, 0]  # (1, L)
    row = next(r for r in stats.result() if r["batch"] == 1 and r["index"] == 0 and r["step"] == 0)
    assert abs(row["value"] - float(-(p * p.clamp_min(1e-30).log()).sum())) <= 1e-5
    t = Tracer()
    t.add("heatmap", match=[name])
    with pytest.raises(SelectionError, match=r"'heatmap' needs a dense .* additive probabilities"):
        t.attach(model)
