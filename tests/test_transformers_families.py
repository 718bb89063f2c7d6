"""The last transformers families of issue 16, each on a tiny random-weight model built from its config.

- TimesFM: its attention falls back to `simple_eager_attention_forward` (not `eager_attention_forward`);
  traced runs equal untraced ones (sdpa and eager) and probs equal eager `output_attentions`.
- SqueezeBERT returns its *scores* (before the softmax, with the -3.4e38 padding mask) as `attentions`;
  traced probs equal a softmax computed from the module's own weights by the definition.
- Chameleon's and Janus's VQ-VAE attention blocks are single-head: probs equal the definition on the
  block's own 1x1 convolutions.
- I-BERT: traced with quant_mode=False (a plain softmax), refused naming `quant_mode` otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attntrace import Observer, Tracer, find_sites  # noqa: E402
from attntrace.core.call import AttentionCall  # noqa: E402
from attntrace.core.errors import AttachError, EditError  # noqa: E402
from tests.coverage_transformers import outputs_equal  # noqa: E402


class Probs(Observer):
    """Passive: keeps every call's probs (and checks probs @ value == output where both exist)."""

    name = "probs"
    needs = frozenset({"probs"})

    def __init__(self, needs: frozenset[str] = frozenset({"probs"})) -> None:
        super().__init__()
        self.needs = needs  # type: ignore[misc]
        self.calls: list[tuple[str, torch.Tensor]] = []
        self.pv_err = 0.0

    def on_call(self, call: AttentionCall) -> None:
        probs = call.probs.detach().clone()
        if {"value", "output"} <= self.needs:
            v = call.value.float()
            if v.shape[1] != probs.shape[1]:
                v = v.repeat_interleave(probs.shape[1] // v.shape[1], dim=1)
            self.pv_err = max(self.pv_err, float((probs @ v - call.output.float()).abs().max()))
        self.calls.append((call.site, probs))


# -- TimesFM ------------------------------------------------------------------------------------------------
def _timesfm(impl: str) -> torch.nn.Module:
    cfg = transformers.TimesFmConfig(
        patch_length=4, context_length=16, horizon_length=4, hidden_size=16, intermediate_size=16, head_dim=8,
        num_attention_heads=2, num_hidden_layers=2, attn_implementation=impl,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.TimesFmModelForPrediction(cfg).eval()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_timesfm_traced_equals_untraced_and_eager(impl: str) -> None:
    torch.set_num_threads(1)
    model = _timesfm(impl)
    oracle = _timesfm("eager")
    oracle.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(0)
    inputs = {"past_values": [torch.randn(12, generator=g), torch.randn(16, generator=g)], "freq": torch.tensor([0, 1])}
    tracer = Tracer()
    obs = tracer.add(Probs(frozenset({"query", "key", "value", "probs", "output"})))
    with torch.no_grad():
        base = model(**inputs)
        ref = oracle(**inputs, output_attentions=True).attentions
        with tracer.attach(model):
            traced = model(**inputs)
    assert outputs_equal(base, traced)
    assert len(ref) == len(obs.calls) == 2  # one call per layer (the padded series is masked, not causal)
    for (_, p), r in zip(obs.calls, ref):
        assert p.shape == r.shape and float((p - r.float()).abs().max()) <= 1e-6
    assert obs.pv_err <= 1e-5


# -- SqueezeBERT --------------------------------------------------------------------------------------------
def test_squeezebert_probs_are_the_softmax_of_its_returned_scores() -> None:
    torch.set_num_threads(1)
    cfg = transformers.SqueezeBertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=38,
        embedding_size=32, q_groups=2, k_groups=2, v_groups=2, post_attention_groups=2, intermediate_groups=2,
        output_groups=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.SqueezeBertModel(cfg).eval()
    ids = torch.randint(3, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, -2:] = 0
    # The reference from the definition: each attention module's inputs (B, C, L) and additive mask,
    # its own 1x1 convolutions, softmax(q·kᵀ/√d + mask).
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [layer.attention.register_forward_pre_hook(lambda m, a: seen.append((a[0], a[1])))
             for layer in model.encoder.layers]  # fmt: skip
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    for h in hooks:
        h.remove()
    tracer = Tracer()
    obs = tracer.add(Probs(frozenset({"query", "key", "value", "probs", "output"})))
    with torch.no_grad(), tracer.attach(model):
        traced = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert outputs_equal(base, traced)
    assert [s for s, _ in obs.calls] == ["encoder.layers.0.attention", "encoder.layers.1.attention"]
    heads, d = 4, 8
    for i, ((x, additive), (_, probs)) in enumerate(zip(seen, obs.calls)):
        att = model.encoder.layers[i].attention
        with torch.no_grad():
            q = att.query(x).view(2, heads, d, 7).transpose(-1, -2)
            k = att.key(x).view(2, heads, d, 7)
        expected = (q @ k / math.sqrt(d) + additive).softmax(-1)
        assert float((probs - expected).abs().max()) <= 1e-6
        # What SqueezeBERT returns as "attentions" are these scores: the padding mask (-3.4e38) included.
        scores = base.attentions[i]
        assert float(scores.min()) < -1e38 and float((probs - scores.softmax(-1)).abs().max()) <= 1e-6
    assert obs.pv_err <= 1e-5


# -- Chameleon's and Janus's VQ-VAE attention blocks ----------------------------------------------------------
def _chameleon_vq() -> torch.nn.Module:
    cfg = transformers.ChameleonVQVAEConfig(
        base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1, resolution=16, latent_channels=32,
        embed_dim=16, num_embeddings=64, attn_resolutions=[8],
    )  # fmt: skip
    return transformers.ChameleonVQVAE(cfg)


def _janus_vq() -> torch.nn.Module:
    cfg = transformers.JanusVQVAEConfig(
        base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1, latent_channels=32, embed_dim=8,
        num_embeddings=64, num_patches=8, projection_dim=16, image_token_embed_dim=16, num_hidden_layers=1,
    )  # fmt: skip
    return transformers.JanusVQVAE(cfg)


@pytest.mark.parametrize("family", ["chameleon", "janus"])
def test_vqvae_attention_blocks_are_single_head(family: str) -> None:
    """taming-transformers' AttnBlock: q/k/v are 1x1 convolutions over all C channels, scores
    bmm((B, HW, C), (B, C, HW)) / √C: one head of (HW, HW) probabilities."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = (_chameleon_vq if family == "chameleon" else _janus_vq)().eval()
    run = model.encode if family == "chameleon" else model
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    blocks = {n: m for n, m in model.named_modules() if type(m).__name__.endswith("AttnBlock")}
    sites = {s.name: s for s in find_sites(model)}
    assert set(blocks) <= set(sites) and all(sites[n].heads == 1 and sites[n].traceable for n in blocks)
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.append((n, a[0]))) for n, m in blocks.items()]
    with torch.no_grad():
        base = run(pixels)
    for h in hooks:
        h.remove()
    tracer = Tracer()
    obs = tracer.add(Probs(frozenset({"query", "key", "value", "probs", "output"})), match=list(blocks))
    with torch.no_grad(), tracer.attach(model):
        traced = run(pixels)
    assert outputs_equal(base, traced)
    assert [s for s, _ in obs.calls] == [n for n, _ in seen] and len(seen) >= 2
    for (name, x), (_, probs) in zip(seen, obs.calls):
        block = blocks[name]
        with torch.no_grad():
            h = block.norm(x)
            q, k = block.q(h).flatten(2), block.k(h).flatten(2)  # (B, C, HW)
        c, hw = q.shape[1], q.shape[2]
        expected = (q.transpose(1, 2) @ k * c**-0.5).softmax(-1)
        assert probs.shape == (2, 1, hw, hw)
        assert float((probs[:, 0] - expected).abs().max()) <= 1e-6
    assert obs.pv_err <= 1e-5


# -- I-BERT ---------------------------------------------------------------------------------------------------
def _ibert(quant_mode: bool) -> torch.nn.Module:
    cfg = transformers.IBertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        quant_mode=quant_mode,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.IBertModel(cfg).eval()


def _text_inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_ibert_plain_softmax_is_traced() -> None:
    """quant_mode=False: `IntSoftmax` runs a plain softmax; probs are what it returns (`output_attentions`)."""
    torch.set_num_threads(1)
    model, inputs = _ibert(False), _text_inputs()
    tracer = Tracer()
    obs = tracer.add(Probs(frozenset({"query", "key", "value", "probs", "output"})))
    with torch.no_grad():
        base = model(**inputs, output_attentions=True)
        with tracer.attach(model):
            traced = model(**inputs, output_attentions=True)
    assert outputs_equal(base, traced)
    assert [s for s, _ in obs.calls] == ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    for (_, p), ref in zip(obs.calls, base.attentions):
        assert float((p - ref).abs().max()) <= 1e-6
    assert obs.pv_err <= 1e-5


def test_ibert_integer_softmax_is_refused_naming_quant_mode() -> None:
    """quant_mode=True: no softmax runs (integer exp approximation); attach refuses in one line, and the
    model is left as it was."""
    torch.set_num_threads(1)
    model = _ibert(True)
    sites = find_sites(model)
    assert sites and all("quant_mode=True" in s.note for s in sites)
    tracer = Tracer()
    tracer.add(Probs())
    with pytest.raises(AttachError, match=r"IBertModel: site .*integer softmax .*quant_mode=False") as err:
        tracer.attach(model)
    assert "\n" not in str(err.value)
    assert not any("forward" in vars(m) for m in model.modules())


# -- Longformer: banded sliding-window probabilities ----------------------------------------------------------
class Banded(Probs):
    """A passive probs reader that understands banded probabilities."""

    probs_layouts = frozenset({"dense", "banded"})

    def on_call(self, call: AttentionCall) -> None:
        super().on_call(call)
        self.layouts = [*getattr(self, "layouts", []), call.layout]


def _longformer() -> torch.nn.Module:
    cfg = transformers.LongformerConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        attention_window=4, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LongformerModel(cfg).eval()


def _banded_reference(att: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Sliding-window probabilities by the definition from the module's own projections (no padding, no
    global tokens): row i, column j is softmax over j of q_i·k_{i-w+j}/√d, keys outside the sequence excluded."""
    b, n, _ = hidden.shape
    h, w = att.num_heads, att.one_sided_attn_window_size
    with torch.no_grad():
        q = att.query(hidden).view(b, n, h, -1).transpose(1, 2) / math.sqrt(att.head_dim)
        k = att.key(hidden).view(b, n, h, -1).transpose(1, 2)
    dense = q @ k.transpose(-1, -2)  # (B, H, L, L)
    scores = torch.full((b, h, n, 2 * w + 1), float("-inf"))
    for i in range(n):
        for j in range(2 * w + 1):
            if 0 <= i - w + j < n:
                scores[..., i, j] = dense[..., i, i - w + j]
    return scores.softmax(-1)


def test_longformer_banded_probs_equal_definition_and_eager() -> None:
    torch.set_num_threads(1)
    model = _longformer()
    ids = torch.randint(3, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    sites = {s.name: s for s in find_sites(model)}
    names = ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    assert all(sites[n].probs_layout == "banded" and sites[n].traceable for n in names)
    hidden: list[torch.Tensor] = []
    hooks = [model.encoder.layer[i].attention.self.register_forward_pre_hook(
        lambda m, a, kw: hidden.append(kw.get("hidden_states", a[0] if a else None)), with_kwargs=True)
        for i in range(2)]  # fmt: skip
    with torch.no_grad():
        plain = model(input_ids=ids)
        ref = model(input_ids=ids, output_attentions=True)
    for h in hooks:
        h.remove()
    tracer = Tracer()
    obs = tracer.add(Banded())
    with torch.no_grad(), tracer.attach(model):
        traced = model(input_ids=ids)  # the modules are asked for their weights; the model is not
        traced_att = model(input_ids=ids, output_attentions=True)
    assert outputs_equal(plain, traced) and outputs_equal(ref, traced_att)
    assert [s for s, _ in obs.calls] == names * 2
    for i, (_, probs) in enumerate(obs.calls[:2]):
        assert obs.layouts[i].probs == "banded" and obs.layouts[i].window == 2 and obs.layouts[i].global_keys == 0
        assert probs.shape == (2, 4, 8, 5)
        assert float((probs - _banded_reference(model.encoder.layer[i].attention.self, hidden[i])).abs().max()) <= 1e-6
        assert float((probs - ref.attentions[i]).abs().max()) <= 1e-6  # eager `output_attentions`


def test_longformer_global_and_padded_tokens_follow_output_attentions() -> None:
    torch.set_num_threads(1)
    model = _longformer()
    ids = torch.randint(3, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, -3:] = 0
    glob = torch.zeros(2, 8, dtype=torch.long)
    glob[:, 0] = 1  # the first token attends globally: one global key column
    inputs = {"input_ids": ids, "attention_mask": mask, "global_attention_mask": glob}
    with torch.no_grad():
        ref = model(**inputs, output_attentions=True)
    tracer = Tracer()
    obs = tracer.add(Banded())
    with torch.no_grad(), tracer.attach(model):
        traced = model(**inputs, output_attentions=True)
    assert outputs_equal(ref, traced)
    for i, (_, probs) in enumerate(obs.calls):
        assert obs.layouts[i].global_keys == 1 and probs.shape == (2, 4, 8, 6)
        assert float((probs - ref.attentions[i]).abs().max()) <= 1e-6


def test_longformer_stats_and_save_work_dense_observers_are_refused(tmp_path: Any) -> None:
    import json

    from safetensors.torch import load_file

    from attntrace.core.errors import SelectionError

    torch.set_num_threads(1)
    model = _longformer()
    ids = torch.randint(3, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids, output_attentions=True).attentions
    tracer = Tracer(output_dir=tmp_path)
    stats = tracer.add("stats", metrics=["entropy", "max"])
    tracer.add("save")
    with torch.no_grad(), tracer.attach(model):
        model(input_ids=ids)
    rows = [r for r in stats.result() if r["site"] == "encoder.layer.1.attention.self" and r["batch"] == 1]
    assert {r["metric"] for r in rows} == {"entropy", "max"}  # read before close(), which releases them
    tracer.close()  # the saver's files and manifest are written
    p = ref[1][1].float()  # (H, L, 2w+1)
    entropy = -(p.clamp_min(1e-30).log() * p).sum(-1).mean(-1)
    for r in rows:
        expected = entropy[r["head"]] if r["metric"] == "entropy" else p.amax(-1).mean(-1)[r["head"]]
        assert abs(r["value"] - float(expected)) <= 1e-5
    manifest = json.loads(next(tmp_path.rglob("manifest.json")).read_text())
    entry = next(e for e in manifest["entries"] if e["site"] == "encoder.layer.0.attention.self")
    layout = (entry["probs_layout"], entry["window"], entry["global_keys"], entry["shape"])
    assert layout == ("banded", 2, 0, [2, 4, 8, 5])
    saved = load_file(str(next(tmp_path.rglob(entry["file"]))))[entry["key"]]
    assert float((saved.float() - ref[0]).abs().max()) <= 1e-3  # stored as float16
    for observer, params in (("heatmap", {}), ("ablate", {"heads": [0]})):
        t = Tracer()
        t.add(observer, **params)
        with pytest.raises(SelectionError, match=rf"'{observer}' needs a dense token x token .* banded probabilities"):
            t.attach(model)
        assert not any("forward" in vars(m) for m in model.modules())


def test_longformer_an_undeclared_edit_is_an_error_not_ignored() -> None:
    class Sneaky(Banded):
        def on_call(self, call: AttentionCall) -> None:
            call.probs = call.probs * 0

    torch.set_num_threads(1)
    model = _longformer()
    tracer = Tracer()
    tracer.add(Sneaky())
    with pytest.raises(EditError, match="read-only"), torch.no_grad(), tracer.attach(model):
        model(input_ids=torch.randint(3, 50, (2, 8), generator=torch.Generator().manual_seed(1)))
    assert not any("forward" in vars(m) for m in model.modules())
