"""Reformer's chunked local and LSH attention, traced read-only as (B, H, L, L) probabilities.

Oracles: the definition (softmax of q·kᵀ/√d over the chunks each query attends, computed here from the
module's own projections), the module's own output (`probs @ v` with v from its value projection), the
weights it returns with `output_attentions=True`, and the untraced model (bit-identical outputs).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attntrace import Observer, Tracer, find_sites  # noqa: E402
from attntrace.core.call import AttentionCall  # noqa: E402
from attntrace.core.errors import AttachError, SelectionError  # noqa: E402
from tests import coverage_transformers as ct  # noqa: E402

LOCAL, LSH = "encoder.layers.0.attention.self_attention", "encoder.layers.1.attention.self_attention"
L, CHUNK = 16, 4


class Keep(Observer):
    """Passive: keeps each call's probs and output (a handful of calls)."""

    needs = frozenset({"probs", "output"})
    probs_layouts = frozenset({"block_sparse"})

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, torch.Tensor, torch.Tensor, Any]] = []

    def on_call(self, call: AttentionCall) -> None:
        self.calls.append((call.site, call.probs.clone(), call.output.clone(), call.layout))


def _reformer(num_hashes: int = 1, is_decoder: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.ReformerConfig(
        vocab_size=50, hidden_size=16, num_attention_heads=2, attention_head_size=8, feed_forward_size=16,
        attn_layers=["local", "lsh"], axial_pos_embds=False, max_position_embeddings=64, hash_seed=0,
        local_attn_chunk_length=CHUNK, lsh_attn_chunk_length=CHUNK, num_buckets=4, num_hashes=num_hashes,
        local_num_chunks_before=1, local_num_chunks_after=1, lsh_num_chunks_before=1, lsh_num_chunks_after=0,
        is_decoder=is_decoder,
    )  # fmt: skip
    return transformers.ReformerModel(cfg).eval()


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, -3:] = 0  # padding in the second row
    return {"input_ids": torch.randint(0, 50, (2, L), generator=g), "attention_mask": mask}


def _heads(x: torch.Tensor) -> torch.Tensor:
    return x.view(x.shape[0], x.shape[1], 2, 8).transpose(1, 2)


@pytest.mark.parametrize("is_decoder", [False, True])
def test_local_and_lsh_probs_equal_definition_output_and_returned_weights(is_decoder: bool) -> None:
    torch.set_num_threads(1)
    model, inputs = _reformer(is_decoder=is_decoder), _inputs()
    sites = {s.name: s for s in find_sites(model)}
    assert sites[LOCAL].probs_layout == sites[LSH].probs_layout == "block_sparse"
    assert sites[LOCAL].traceable and sites[LSH].traceable
    hidden: dict[str, torch.Tensor] = {}

    def keep_input(name: str) -> Any:
        def hook(_: torch.nn.Module, args: Any, kw: dict[str, Any]) -> None:
            hidden.setdefault(name, (args[0] if args else kw["hidden_states"]).clone())

        return hook

    hooks = [model.get_submodule(n).register_forward_pre_hook(keep_input(n), with_kwargs=True) for n in (LOCAL, LSH)]
    plain = ct.run(model, inputs)
    asked = ct.run(model, inputs, output_attentions=True)
    for h in hooks:
        h.remove()
    tracer = Tracer()
    keep = tracer.add(Keep())
    with tracer.attach(model):
        traced = ct.run(model, inputs)
        traced_asked = ct.run(model, inputs, output_attentions=True)
    assert ct.outputs_equal(plain, traced) and ct.outputs_equal(asked, traced_asked)
    assert not [n for n, m in model.named_modules() if "forward" in vars(m)]
    calls = {site: (p, o, lay) for site, p, o, lay in keep.calls[:2]}
    assert set(calls) == {LOCAL, LSH}
    real = inputs["attention_mask"].bool()
    for name, (probs, output, layout) in calls.items():
        att = model.get_submodule(name)
        x = hidden[name]
        assert layout.probs == "block_sparse" and probs.shape == (2, 2, L, L)
        assert float((probs.sum(-1) - 1).abs().max()) <= 1e-5
        # the module's own output, from its value projection: the weights sit on the right keys
        v = _heads(att.value(x))
        assert float((probs @ v - output).abs().max()) <= 1e-5
        # no weight on padding keys
        assert float(probs[1, :, :, ~real[1]].abs().max()) <= 1e-6
        if name == LOCAL:
            # definition: query i in chunk c attends the keys of chunks c-1, c, c+1 (wrapping around)
            q, k = _heads(att.query(x)), _heads(att.key(x)) / math.sqrt(8)
            chunk = torch.arange(L) // CHUNK
            near = torch.isin((chunk[:, None] - chunk[None, :]) % (L // CHUNK), torch.tensor([0, 1, L // CHUNK - 1]))
            allowed = near[None] & real[:, None, :]
            if is_decoder:
                allowed = allowed & torch.ones(L, L, dtype=torch.bool).tril()
            scores = (q @ k.transpose(-1, -2)).masked_fill(~allowed[:, None], float("-inf"))
            assert float((probs - scores.softmax(-1)).abs().max()) <= 1e-5
            # what the module returns: (B, H, chunks, chunk, 3·chunk) on its own chunk and the two around it
            returned = asked.attentions[0].reshape(2, 2, L, 3 * CHUNK)
            assert torch.equal(returned.sum(-1), probs.sum(-1).to(returned.dtype)) or torch.allclose(
                returned.sum(-1), probs.sum(-1), atol=1e-6
            )
            assert torch.equal(returned[..., CHUNK : 2 * CHUNK].reshape(2, 2, L // CHUNK, CHUNK, CHUNK),
                               probs.reshape(2, 2, L // CHUNK, CHUNK, L // CHUNK, CHUNK).diagonal(0, 2, 4)
                               .permute(0, 1, 4, 2, 3))  # fmt: skip
        else:
            # each query's weights lie on at most two chunks of its hash-sorted neighbours
            assert int((probs > 0).sum(-1).max()) <= 2 * CHUNK


def test_lsh_with_several_hash_rounds_is_refused_by_name() -> None:
    model = _reformer(num_hashes=2)
    tracer = Tracer()
    tracer.add(Keep())
    with pytest.raises(AttachError, match="num_hashes=2") as err:
        tracer.attach(model)
    assert "LSHSelfAttention" in str(err.value) and LSH in str(err.value)
    assert not [n for n, m in model.named_modules() if "forward" in vars(m)]
    # the local layer alone is traced
    tracer = Tracer()
    keep = tracer.add(Keep(), match=[LOCAL])
    with tracer.attach(model):
        ct.run(model, _inputs())
    assert [c[0] for c in keep.calls] == [LOCAL]


def test_stats_reads_the_probs_dense_observers_and_editors_are_refused() -> None:
    model, inputs = _reformer(), _inputs()
    for observer, params in (("heatmap", {}), ("ablate", {"heads": [0]})):
        tracer = Tracer()
        tracer.add(observer, **params)
        with pytest.raises(SelectionError, match=rf"'{observer}' needs a dense .* block_sparse probabilities"):
            tracer.attach(model)
        assert not [n for n, m in model.named_modules() if "forward" in vars(m)]
    tracer = Tracer()
    keep = tracer.add(Keep(), match=[LOCAL])
    stats = tracer.add("stats", match=[LOCAL], metrics=["entropy"])
    with tracer.attach(model):
        ct.run(model, inputs)
    p = keep.calls[0][1][0]  # batch item 0: (H, L, L)
    entropy = -(p.clamp_min(1e-30).log() * p).sum(-1).mean(-1)
    rows = [r for r in stats.result() if r["batch"] == 0]
    assert sorted(r["head"] for r in rows) == [0, 1]
    for r in rows:
        assert abs(r["value"] - float(entropy[r["head"]])) <= 1e-5


def test_cached_generation_is_unchanged_prompt_traced_decoding_steps_named() -> None:
    # Cached decoding steps attend to the states Reformer gathers from its cache (by chunk or hash bucket), not
    # to token positions: they run untraced, with one warning per site naming why.
    torch.manual_seed(0)
    cfg = transformers.ReformerConfig(
        vocab_size=50, hidden_size=16, num_attention_heads=2, attention_head_size=8, feed_forward_size=16,
        attn_layers=["local", "lsh"], axial_pos_embds=False, max_position_embeddings=64, hash_seed=0,
        local_attn_chunk_length=CHUNK, lsh_attn_chunk_length=CHUNK, num_buckets=4, num_hashes=1, is_decoder=True,
        pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    model = transformers.ReformerModelWithLMHead(cfg).eval()
    ids = torch.randint(2, 50, (1, 12), generator=torch.Generator().manual_seed(3))
    plain = model.generate(ids, max_new_tokens=5, do_sample=False)
    tracer = Tracer()
    keep = tracer.add(Keep())
    with tracer.attach(model), pytest.warns(RuntimeWarning, match="cached decoding steps") as record:
        traced = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(plain, traced)
    assert sorted(c[0] for c in keep.calls) == sorted(n.replace("encoder.", "reformer.encoder.") for n in (LOCAL, LSH))
    assert all(c[1].shape == (1, 2, 12, 12) for c in keep.calls)
    assert len([w for w in record if "cached decoding" in str(w.message)]) == 2
