"""Block-sparse attention (BigBird, BigBird-Pegasus' encoder) traced with `probs_layout="block_sparse"`.

The module returns a (B, H, L, L) matrix filled on the blocks each query attends. At inference transformers
draws no random blocks (each row's random blocks are key block 0 again) and that matrix holds block 0's
weight once, so its rows sum to less than 1; the traced probs are the weight each key receives. Checked
against the definition (a softmax over the multiset of attended keys, from the module's own projections),
against the module's own output (probs @ value == its context), and against eager's `output_attentions`.

Block-local attention (LongT5 local and transient-global) with `probs_layout="block_local"`: its
(B, blocks, H, block, 3·block + global) weights as (B, H, L, 3·block + global), equal to eager's.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attntrace import Observer, Tracer, find_sites  # noqa: E402
from attntrace.core.call import AttentionCall  # noqa: E402
from attntrace.core.errors import EditError, SelectionError  # noqa: E402
from tests.coverage_transformers import outputs_equal  # noqa: E402

BS, R, L = 2, 1, 16  # block size, random blocks; L > (5 + 2R)·BS so the model keeps block-sparse attention


class Sparse(Observer):
    """Passive: keeps every call's probs and layout."""

    needs = frozenset({"probs"})
    probs_layouts = frozenset({"block_sparse"})

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, torch.Tensor, Any]] = []

    def on_call(self, call: AttentionCall) -> None:
        self.calls.append((call.site, call.probs.detach().clone(), call.layout))


def _bigbird() -> torch.nn.Module:
    cfg = transformers.BigBirdConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        block_size=BS, num_random_blocks=R, max_position_embeddings=64, attention_type="block_sparse",
        sep_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BigBirdModel(cfg).eval()


def _ids() -> torch.Tensor:
    return torch.randint(3, 50, (2, L), generator=torch.Generator().manual_seed(1))


def _reference(att: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """BigBird's ITC pattern by the definition (no padding): query block 0 and the last attend every key;
    block 1 attends blocks 0-2 and the last; block nb-2 blocks 0 and the last three; a middle block i blocks
    0, i-1..i+1 and the last; blocks 1..nb-2 also attend R random blocks, which at inference are block 0.
    A key attended n times gets n shares of the softmax over the multiset of attended keys."""
    b, n, _ = hidden.shape
    h, nb = att.num_attention_heads, n // BS
    with torch.no_grad():
        q = att.query(hidden).view(b, n, h, -1).transpose(1, 2)
        k = att.key(hidden).view(b, n, h, -1).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    count = torch.zeros(nb, nb)
    for i in range(nb):
        if i in (0, nb - 1):
            count[i] = 1
            continue
        for j in {0, nb - 1, *range(max(i - 1, 0), min(i + 2, nb))}:
            count[i, j] = 1
        count[i, 0] += R
    count = count.repeat_interleave(BS, 0).repeat_interleave(BS, 1)
    weights = count * (scores - scores.amax(-1, keepdim=True)).exp()
    return weights / weights.sum(-1, keepdim=True)


def test_bigbird_block_sparse_probs_equal_definition_output_and_eager() -> None:
    torch.set_num_threads(1)
    model = _bigbird()
    ids = _ids()
    names = ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    sites = {s.name: s for s in find_sites(model)}
    assert all(sites[n].probs_layout == "block_sparse" and sites[n].traceable for n in names)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (hidden states in, context out) per call
    hooks = [model.encoder.layer[i].attention.self.register_forward_hook(
        lambda m, a, kw, out: seen.append((kw.get("hidden_states", a[0] if a else None), out[0])),
        with_kwargs=True) for i in range(2)]  # fmt: skip
    with torch.no_grad():
        plain = model(input_ids=ids)
        ref = model(input_ids=ids, output_attentions=True)
    for hook in hooks:
        hook.remove()
    assert type(model.encoder.layer[0].attention.self).__name__ == "BigBirdBlockSparseAttention"
    tracer = Tracer()
    obs = tracer.add(Sparse())
    with torch.no_grad(), tracer.attach(model):
        traced = model(input_ids=ids)
        traced_att = model(input_ids=ids, output_attentions=True)
    assert outputs_equal(plain, traced) and outputs_equal(ref, traced_att)
    assert not any("forward" in vars(m) for m in model.modules())
    assert [s for s, _, _ in obs.calls] == names * 2
    for i, (_, probs, layout) in enumerate(obs.calls[:2]):
        att = model.encoder.layer[i].attention.self
        hidden, context = seen[i]
        assert layout.probs == "block_sparse" and probs.shape == (2, 4, L, L)
        assert float((probs - _reference(att, hidden)).abs().max()) <= 1e-6
        with torch.no_grad():
            v = att.value(hidden).view(2, L, 4, -1).transpose(1, 2)
        assert float((probs @ v - context.view(2, L, 4, -1).transpose(1, 2)).abs().max()) <= 1e-5
        # eager's matrix: the same, but block 0 counted once in rows BS..L-BS (repeated by the random blocks)
        eager = ref.attentions[i].clone()
        assert float((eager.sum(-1) - 1).abs().max()) > 0.05  # not a probability matrix as returned
        eager[:, :, BS:-BS, :BS] *= 1 + R
        assert float((probs - eager).abs().max()) <= 1e-6


def test_bigbird_stats_and_save_work_dense_observers_and_editors_are_refused(tmp_path: Any) -> None:
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    model = _bigbird()
    ids = _ids()
    tracer = Tracer()
    obs = tracer.add(Sparse())
    with torch.no_grad(), tracer.attach(model):
        model(input_ids=ids)
    tracer = Tracer(output_dir=tmp_path)
    stats = tracer.add("stats", metrics=["entropy", "max"])
    tracer.add("save", dtype="float32")
    with torch.no_grad(), tracer.attach(model):
        model(input_ids=ids)
    rows = [r for r in stats.result() if r["site"] == "encoder.layer.1.attention.self" and r["batch"] == 1]
    tracer.close()  # the saver's files and manifest are written (and the stats released)
    p = obs.calls[1][1][1]  # layer 1, batch item 1: (H, L, L)
    entropy = -(p.clamp_min(1e-30).log() * p).sum(-1).mean(-1)
    assert {r["metric"] for r in rows} == {"entropy", "max"}
    for r in rows:
        expected = entropy[r["head"]] if r["metric"] == "entropy" else p.amax(-1).mean(-1)[r["head"]]
        assert abs(r["value"] - float(expected)) <= 1e-5
    manifest = json.loads(next(tmp_path.rglob("manifest.json")).read_text())
    entry = next(e for e in manifest["entries"] if e["site"] == "encoder.layer.0.attention.self")
    assert (entry["probs_layout"], entry["shape"]) == ("block_sparse", [2, 4, L, L])
    saved = load_file(str(next(tmp_path.rglob(entry["file"]))))[entry["key"]]
    assert torch.equal(saved, obs.calls[0][1])
    for observer, params in (("heatmap", {}), ("ablate", {"heads": [0]})):
        t = Tracer()
        t.add(observer, **params)
        with pytest.raises(SelectionError, match=rf"'{observer}' needs a dense .* block_sparse probabilities"):
            t.attach(model)
        assert not any("forward" in vars(m) for m in model.modules())

    class Sneaky(Sparse):
        def on_call(self, call: AttentionCall) -> None:
            call.probs = call.probs * 0

    t = Tracer()
    t.add(Sneaky())
    with pytest.raises(EditError, match="read-only"), torch.no_grad(), t.attach(model):
        model(input_ids=ids)
    assert not any("forward" in vars(m) for m in model.modules())


def test_bigbird_pegasus_encoder_block_sparse_is_traced() -> None:
    torch.set_num_threads(1)
    cfg = transformers.BigBirdPegasusConfig(
        vocab_size=50, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, block_size=BS, num_random_blocks=R,
        max_position_embeddings=64, attention_type="block_sparse",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BigBirdPegasusModel(cfg).eval()
    ids = _ids()
    name = "encoder.layers.0.self_attn.self"
    assert next(s for s in find_sites(model) if s.name == name).probs_layout == "block_sparse"
    inputs = {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
    with torch.no_grad():
        ref = model(**inputs, output_attentions=True)
    tracer = Tracer()
    obs = tracer.add(Sparse(), match=[name])
    with torch.no_grad(), tracer.attach(model):
        traced = model(**inputs, output_attentions=True)
    assert all(torch.equal(a, b) for a, b in zip(ref.to_tuple(), traced.to_tuple()) if isinstance(a, torch.Tensor))
    ((_, probs, _),) = obs.calls
    assert float((probs.sum(-1) - 1).abs().max()) <= 1e-5
    eager = ref.encoder_attentions[0].clone()
    eager[:, :, BS:-BS, :BS] *= 1 + R
    assert float((probs - eager).abs().max()) <= 1e-6


@pytest.mark.parametrize(("attention", "global_keys"), [("local", 0), ("transient-global", 2)])
def test_longt5_block_local_probs_equal_eager(attention: str, global_keys: int, tmp_path: Any) -> None:
    torch.set_num_threads(1)
    cfg = transformers.LongT5Config(
        vocab_size=50, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=1, num_heads=4,
        local_radius=2, global_block_size=4, encoder_attention_type=attention,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LongT5Model(cfg).eval()
    n = 11  # not a multiple of the block (3): the padded rows are dropped
    ids = torch.randint(3, 50, (2, n), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, -3:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids[:, :3]}
    names = [f"encoder.block.{i}.layer.0.{'Local' if attention == 'local' else 'TransientGlobal'}SelfAttention"
             for i in range(2)]  # fmt: skip
    assert [s.name for s in find_sites(model) if s.probs_layout == "block_local"] == names
    with torch.no_grad():
        plain = model(**inputs)
        ref = model(**inputs, output_attentions=True)
    tracer = Tracer(output_dir=tmp_path)
    obs = tracer.add(Sparse(), match=names)
    obs.probs_layouts = frozenset({"block_local"})  # type: ignore[misc]
    stats = tracer.add("stats", match=names, metrics=["entropy"])
    with torch.no_grad(), tracer.attach(model):
        traced = model(**inputs)
        traced_att = model(**inputs, output_attentions=True)
    assert outputs_equal(plain, traced) and outputs_equal(ref, traced_att)
    assert [s for s, _, _ in obs.calls] == names * 2
    for i, (_, probs, layout) in enumerate(obs.calls[:2]):
        assert (layout.probs, layout.window, layout.global_keys) == ("block_local", 3, global_keys)
        assert probs.shape == (2, 4, n, 9 + global_keys)
        eager = ref.encoder_attentions[i]  # (B, blocks, H, 3, 9 + G)
        assert eager.dim() == 5
        assert float((probs - eager.transpose(1, 2).flatten(2, 3)[:, :, :n]).abs().max()) <= 1e-6
        assert float((probs.sum(-1) - 1).abs().max()) <= 1e-5
        # column j of query i is key (i // 3 - 1)·3 + j: from query 7, keys 8, 9 (columns 5, 6) get weight but
        # not where padded (batch 1); key 10 (column 7) is beyond the local radius 2; key 5 (column 2) is within
        assert float(probs[1, :, 7, 5:8].abs().max()) <= 1e-6 < float(probs[0, :, 7, [2, 5, 6]].min())
        assert float(probs[0, :, 7, [0, 1, 7, 8]].abs().max()) <= 1e-6
    p = obs.calls[0][1][0]
    entropy = -(p.clamp_min(1e-30).log() * p).sum(-1).mean(-1)
    rows = [r for r in stats.result() if r["site"] == names[0] and r["batch"] == 0 and r["index"] == 0]
    assert len(rows) == 8  # two forwards: the same probs twice
    assert all(abs(r["value"] - float(entropy[r["head"]])) <= 1e-5 for r in rows)
    for observer, params in (("heatmap", {}), ("ablate", {"heads": [0]})):
        t = Tracer()
        t.add(observer, match=names, **params)
        with pytest.raises(SelectionError, match=rf"'{observer}' needs a dense .* block_local probabilities"):
            t.attach(model)
        assert not any("forward" in vars(m) for m in model.modules())


class Both(Sparse):
    """Passive: reads dense and block-sparse probs (follows BigBird's switch between them)."""

    probs_layouts = frozenset({"dense", "block_sparse"})


def _sparse_pair(family: str) -> tuple[torch.nn.Module, torch.nn.Module, list[str], dict[str, Any]]:
    """Two identical block-sparse models (one stays untraced), their encoder attention sites, extra inputs."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        if family == "big_bird":
            models.append(_bigbird())
        else:
            cfg = transformers.BigBirdPegasusConfig(
                vocab_size=50, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, block_size=BS,
                num_random_blocks=R, max_position_embeddings=64, attention_type="block_sparse",
            )  # fmt: skip
            models.append(transformers.BigBirdPegasusModel(cfg).eval())
    if family == "big_bird":
        return models[0], models[1], [f"encoder.layer.{i}.attention.self" for i in range(2)], {}
    dec = {"decoder_input_ids": _ids()[:, :3]}
    return models[0], models[1], [f"encoder.layers.{i}.self_attn.self" for i in range(2)], dec


def _patched(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if {"forward", "set_attention_type"} & set(vars(m)) or m._forward_pre_hooks]  # fmt: skip


@pytest.mark.parametrize("family", ["big_bird", "bigbird_pegasus"])
def test_short_input_switch_to_full_attention_is_followed(family: str) -> None:
    """A short input makes BigBird swap its block-sparse modules for full attention inside forward (for good):
    the tracer follows onto the new modules (dense probs, equal to eager's), says so once, and detaches clean."""
    torch.set_num_threads(1)
    plain_model, model, names, extra = _sparse_pair(family)
    short, long = _ids()[:, :8], _ids()  # 8 <= (5 + 2R)·BS = 14 < 16
    tracer = Tracer()
    obs = tracer.add(Both(), match=names)
    announced = r"switched its attention to 'original_full' at a sequence length of 8 \(block-sparse attention needs "
    announced += r"more than .* = 14 tokens.*traced as .*'dense'"
    with torch.no_grad(), tracer.attach(model), pytest.warns(RuntimeWarning, match=announced):
        traced = [model(input_ids=short, **extra), model(input_ids=long, **extra)]
    assert _patched(model) == []
    with torch.no_grad():
        plain = [plain_model(input_ids=short, **extra), plain_model(input_ids=long, **extra)]
        # transformers returns no attentions from the call that switched; now full, it does
        eager = plain_model(input_ids=short, **extra, output_attentions=True)
    for a, b in zip(plain, traced):
        assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    assert [s for s, _, _ in obs.calls] == names * 2
    assert all(layout.probs == "dense" for _, _, layout in obs.calls)
    assert [p.shape[-1] for _, p, _ in obs.calls] == [8, 8, 16, 16]
    ref = eager.attentions if family == "big_bird" else eager.encoder_attentions
    for (_, probs, _), expected in zip(obs.calls, ref):
        assert torch.allclose(probs, expected, atol=1e-6)
    assert type(model.get_submodule(names[0])) is type(plain_model.get_submodule(names[0]))
    assert type(model.get_submodule(names[0])).__name__.endswith("SelfAttention")

    # Switched back by the user while attached: followed to block-sparse again; an observer reading only
    # block-sparse probs is not carried onto a dense module, with a warning naming it.
    owner = model if family == "big_bird" else model.encoder
    plain_owner = plain_model if family == "big_bird" else plain_model.encoder
    plain_owner.set_attention_type("block_sparse")
    tracer = Tracer()
    obs = tracer.add(Both(), match=names)
    with torch.no_grad(), tracer.attach(model):
        owner.set_attention_type("block_sparse")
        with pytest.warns(RuntimeWarning, match=r"switched its attention to 'block_sparse' at a sequence length of "
                          r"16; .*traced as .*BlockSparseAttention \(probs layout 'block_sparse'\)"):  # fmt: skip
            traced_sparse = model(input_ids=long, **extra)
    with torch.no_grad():
        assert torch.equal(plain_model(input_ids=long, **extra).last_hidden_state, traced_sparse.last_hidden_state)
    assert [(s, layout.probs) for s, _, layout in obs.calls] == [(n, "block_sparse") for n in names]
    assert _patched(model) == []
    tracer = Tracer()
    tracer.add(Sparse(), match=names)
    with torch.no_grad(), tracer.attach(model), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=short, **extra)
    ours = [str(w.message) for w in caught if "attntrace" in str(w.message)]
    assert len(ours) == 1  # once, not per site
    assert re.search(rf"replaced site '{names[0]}' .* by \w+SelfAttention \('original_full'\), which is not traced: "
                     r"observer 'sparse' reads block_sparse probabilities, not dense ones", ours[0])  # fmt: skip
    assert _patched(model) == []
