"""Core tracer: transparency, exact probabilities, restoration and interception traps on every core family."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from tiny import FAMILIES, run

from attntrace import AttachError, AttentionCall, Observer, SelectionError, Tracer, kernel
from attntrace.adapters.diffusers.proxy import AttentionProxy


class Recorder(Observer):
    """Reads everything a passive observer can read, and checks probs against the kernel output."""

    needs = frozenset({"query", "key", "value", "probs", "output"})

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[AttentionCall] = []
        self.max_err = 0.0
        self.row_err = 0.0

    def on_call(self, call: AttentionCall) -> None:
        self.calls.append(call)
        p, out = call.probs, call.output
        assert p.dtype == torch.float32
        assert p.shape == (*call.query.shape[:-1], call.key.shape[-2])
        v = kernel.expand_kv_heads(call.value, call.heads)
        self.max_err = max(self.max_err, (p @ v.float() - out.float()).abs().max().item())
        sums = p.sum(-1)
        live = sums > 0  # fully masked rows are zeros, as the kernel returns
        if live.any():
            self.row_err = max(self.row_err, (sums[live] - 1).abs().max().item())


def processors(model: torch.nn.Module) -> dict[str, object]:
    return {n: m.processor for n, m in model.named_modules() if hasattr(m, "set_processor")}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transparent_exact_and_restored(family: str) -> None:
    model, inputs = FAMILIES[family]()
    reference = run(model, inputs)
    before = processors(model)
    tracer = Tracer()
    rec = tracer.add(Recorder())
    sites = tracer.sites(model)
    with tracer.attach(model) as att:
        assert all(isinstance(m.processor, AttentionProxy) for m in (s.module for s in sites))
        traced = run(model, inputs)
        assert att.step == 0
    assert torch.equal(traced, reference), "passive observers changed the output"
    assert {c.site for c in rec.calls} == {s.name for s in sites}, "a site was never seen"
    assert rec.max_err < 1e-5
    assert rec.row_err < 1e-5
    after = processors(model)
    assert all(after[k] is v for k, v in before.items()), "detach did not restore the same objects"


def test_joint_token_ranges_sd3_image_first_flux_text_first() -> None:
    for family, text_first in (("sd3", False), ("flux", True)):
        model, inputs = FAMILIES[family]()
        tracer = Tracer()
        rec = tracer.add(Recorder(), kind="joint")
        with tracer.attach(model):
            run(model, inputs)
        call = rec.calls[0]
        text_len = inputs["encoder_hidden_states"].shape[1]
        assert call.kind == "joint"
        assert call.text_tokens is not None and call.image_tokens is not None
        assert call.text_tokens.stop - call.text_tokens.start == text_len
        assert (call.text_tokens.start == 0) == text_first
        total = call.query.shape[-2]
        assert call.image_tokens.stop - call.image_tokens.start == total - text_len


def test_kind_filter_and_glob_with_processor_suffix() -> None:
    model, inputs = FAMILIES["sd15"]()
    key = next(k for k in model.attn_processors if k.endswith("attn2.processor"))
    tracer = Tracer()
    rec = tracer.add(Recorder(), match=key)
    cross = tracer.add(Recorder(), match="up_blocks.*", kind="cross")
    with tracer.attach(model):
        run(model, inputs)
    assert {c.site for c in rec.calls} == {key.removesuffix(".processor")}
    assert cross.calls and all(c.kind == "cross" and c.site.startswith("up_blocks.") for c in cross.calls)
    assert all(c.is_cross and c.text_tokens == slice(0, 7) for c in cross.calls)


def test_unmatched_sites_are_not_touched() -> None:
    model, inputs = FAMILIES["sd15"]()
    before = processors(model)
    tracer = Tracer({"rules": [{"use": "shapes", "match": "mid_block.*attn1"}]})
    with tracer.attach(model) as att:
        now = processors(model)
        proxied = [n for n, p in now.items() if isinstance(p, AttentionProxy)]
        assert proxied == ["mid_block.attentions.0.transformer_blocks.0.attn1"]
        assert all(now[n] is before[n] for n in now if n not in proxied)
        assert att.traced_sites == proxied


class CountSDPA(torch.overrides.TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is F.scaled_dot_product_attention:
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_probs_computed_only_when_needed_and_edit_runs_attention_once() -> None:
    model, inputs = FAMILIES["sd15"]()
    n_sites = len(Tracer().sites(model))

    class QKVOnly(Observer):
        needs = frozenset({"query"})

        def on_call(self, call: AttentionCall) -> None:
            assert call.computed_probs is None
            call.query.shape  # noqa: B018

    class Scale(Observer):
        needs = frozenset({"probs"})
        edits = True

        def on_call(self, call: AttentionCall) -> None:
            call.probs = call.probs * 1.0

    tracer = Tracer()
    tracer.add(QKVOnly())
    with tracer.attach(model), CountSDPA() as counter:
        run(model, inputs)
    assert counter.n == n_sites  # the fused kernel ran once per site, probs never computed
    tracer = Tracer()
    tracer.add(Scale(), kind="cross")
    with tracer.attach(model), CountSDPA() as counter:
        edited = run(model, inputs)
    assert counter.n == n_sites // 2  # cross sites skipped the fused kernel
    assert torch.allclose(edited, run(model, inputs), atol=1e-5)


def test_edit_order_each_observer_sees_previous_edits() -> None:
    model, inputs = FAMILIES["sd15"]()
    seen: list[float] = []

    class Zero(Observer):
        edits = True

        def on_call(self, call: AttentionCall) -> None:
            call.value = torch.zeros_like(call.value)

    class Look(Observer):
        needs = frozenset({"output"})

        def on_call(self, call: AttentionCall) -> None:
            seen.append(call.output.abs().max().item())

    tracer = Tracer()
    tracer.add(Zero(), match="*attn2")
    tracer.add(Look(), match="*attn2")
    with tracer.attach(model):
        run(model, inputs)
    assert seen and max(seen) == 0.0


def test_keyword_arguments_reach_the_wrapped_processor() -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    got: list[float] = []

    class ScaledProcessor(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     my_scale: float = 1.0, *args, **kwargs):  # type: ignore[no-untyped-def]  # fmt: skip
            got.append(my_scale)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    model, inputs = FAMILIES["sd15"]()
    model.set_attn_processor(ScaledProcessor())
    tracer = Tracer({"rules": [{"use": "shapes"}]})
    with tracer.attach(model):
        proc = model.mid_block.attentions[0].transformer_blocks[0].attn1.processor
        assert "my_scale" in inspect.signature(proc.__call__).parameters
        run(model, {**inputs, "cross_attention_kwargs": {"my_scale": 3.0}})
    assert got and set(got) == {3.0}


def test_attribute_reads_and_writes_pass_through() -> None:
    model, inputs = FAMILIES["flux"]()
    tracer = Tracer({"rules": [{"use": "shapes"}]})
    with tracer.attach(model):
        model.set_attention_backend("_native_math")
        for s in tracer.sites(model):
            proxy = s.module.processor
            assert isinstance(proxy, AttentionProxy)
            assert proxy.wrapped_processor._attention_backend == "_native_math"
        run(model, inputs)
    assert all(s.module.processor._attention_backend == "_native_math" for s in tracer.sites(model))


def test_shared_processor_object_gets_one_proxy_per_site() -> None:
    model, inputs = FAMILIES["sd3"]()
    block = model.transformer_blocks[0]
    shared = block.attn.processor
    block.attn2.processor = shared  # one object shared by two modules, as SD3 dual attention does
    tracer = Tracer()
    rec = tracer.add(Recorder(), match="transformer_blocks.0.*")
    with tracer.attach(model):
        assert block.attn.processor is not block.attn2.processor
        run(model, inputs)
    assert {c.site for c in rec.calls} == {"transformer_blocks.0.attn", "transformer_blocks.0.attn2"}
    assert block.attn.processor is shared and block.attn2.processor is shared


def test_module_processor_with_weights_stays_visible() -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    class WeightedProcessor(torch.nn.Module):
        """An IP-Adapter-style processor: an nn.Module with its own weights."""

        def __init__(self, dim: int) -> None:
            super().__init__()
            self.gate = torch.nn.Linear(dim, dim)
            self.inner = AttnProcessor2_0()

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):  # type: ignore[no-untyped-def]
            out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
            return out + 0 * self.gate(out)

    model, inputs = FAMILIES["sd15"]()
    attn = model.mid_block.attentions[0].transformer_blocks[0].attn1
    attn.set_processor(WeightedProcessor(attn.inner_dim if hasattr(attn, "inner_dim") else 64))
    keys = set(model.state_dict())
    reference = run(model, inputs)
    tracer = Tracer()
    rec = tracer.add(Recorder(), match="mid_block.*attn1")
    with tracer.attach(model):
        assert set(model.state_dict()) == keys
        model.to(torch.float64)
        assert attn.processor.gate.weight.dtype == torch.float64
        assert attn.processor.wrapped_processor.gate.weight.dtype == torch.float64
        model.to(torch.float32)
        assert torch.equal(run(model, inputs), reference)
    assert rec.calls
    assert set(model.state_dict()) == keys and isinstance(attn.processor, WeightedProcessor)


def test_observer_exception_detaches_and_restores() -> None:
    model, inputs = FAMILIES["sd15"]()
    before = processors(model)

    class Boom(Observer):
        def on_call(self, call: AttentionCall) -> None:
            raise RuntimeError("boom")

    tracer = Tracer()
    tracer.add(Boom(), match="*attn2")
    tracer.attach(model)
    with pytest.raises(RuntimeError, match="boom") as info:
        run(model, inputs)
    assert any("detached" in n for n in getattr(info.value, "__notes__", []))
    assert all(processors(model)[k] is v for k, v in before.items())
    assert tracer.attachment is None
    tracer.detach()  # idempotent


def test_attach_failing_half_way_restores_everything() -> None:
    model, inputs = FAMILIES["sd15"]()
    before = processors(model)

    class FailsOnAttach(Observer):
        def on_attach(self, attachment: object) -> None:
            raise RuntimeError("cannot start")

    tracer = Tracer({"rules": [{"use": "shapes"}]})
    tracer.add(FailsOnAttach())
    with pytest.raises(RuntimeError):
        tracer.attach(model)
    assert all(processors(model)[k] is v for k, v in before.items())
    assert not model._forward_pre_hooks


def test_user_replacing_processors_while_attached_is_detected() -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    model, inputs = FAMILIES["sd15"]()
    tracer = Tracer({"rules": [{"use": "shapes"}]})
    tracer.attach(model)
    mine = AttnProcessor2_0()
    model.set_attn_processor(mine)
    with pytest.warns(RuntimeWarning, match="replaced while the tracer was attached"):
        tracer.detach()
    assert all(p is mine for p in processors(model).values())


def test_second_tracer_on_attached_model_is_an_error() -> None:
    model, _ = FAMILIES["sd15"]()
    first = Tracer({"rules": [{"use": "shapes"}]})
    second = Tracer({"rules": [{"use": "shapes"}]})
    with first.attach(model):
        with pytest.raises(AttachError, match="already traced by another tracer"):
            second.attach(model)
        with pytest.raises(AttachError, match="already attached"):
            first.attach(model)
    with second.attach(model):
        pass


def test_pattern_matching_nothing_is_an_error_with_suggestions() -> None:
    model, _ = FAMILIES["sd15"]()
    tracer = Tracer({"rules": [{"use": "shapes", "match": "up_blocks.*.atn2"}]})
    with pytest.raises(SelectionError, match=r"rules\.0\.match: pattern 'up_blocks\.\*\.atn2' matches no site") as e:
        tracer.attach(model)
    assert "up_blocks.1.attentions" in str(e.value)
    assert not any(isinstance(p, AttentionProxy) for p in processors(model).values())
    lenient = Tracer({"strict": False, "rules": [{"use": "shapes", "match": "nothing*"}]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lenient.attach(model).detach()
    assert any("matches no site" in str(w.message) for w in caught)


def test_steps_and_timesteps() -> None:
    model, inputs = FAMILIES["sd15"]()
    tracer = Tracer()
    every_other = tracer.add(Recorder(), match="mid_block.*attn1", steps="0:10:2")
    ended: list[int] = []

    class End(Observer):
        def on_step_end(self, step: int) -> None:
            ended.append(step)

    tracer.add(End(), match="mid_block.*attn1")
    with tracer.attach(model):
        for t in (900, 600, 300, 10):
            run(model, {**inputs, "timestep": torch.tensor(t)})
    assert [c.step for c in every_other.calls] == [0, 2]
    assert [c.timestep for c in every_other.calls] == [900.0, 300.0]
    assert ended == [0, 1, 2, 3]


def test_step_by_timestep_groups_guidance_calls() -> None:
    model, inputs = FAMILIES["sd15"]()
    tracer = Tracer({"step_by": "timestep"})
    rec = tracer.add(Recorder(), match="mid_block.*attn1")
    with tracer.attach(model):
        for t in (900, 900, 500, 500):
            run(model, {**inputs, "timestep": torch.tensor(t)})
    assert [c.step for c in rec.calls] == [0, 0, 1, 1]


def test_pipeline_is_traced_through_its_denoiser() -> None:
    model, inputs = FAMILIES["sd15"]()

    class FakePipe:  # any object with a `unet` attribute, as DiffusionPipeline has
        def __init__(self, unet: torch.nn.Module) -> None:
            self.unet = unet

    tracer = Tracer({"rules": [{"use": "shapes"}]})
    with tracer.attach(FakePipe(model)) as att:
        assert att.model is model
        run(model, inputs)
    assert tracer.observers["shapes"].result()


class _ChunkedCondHalf(Observer):
    """Collects `iter_probs(batch=...)` chunks next to the full `probs` (for comparison)."""

    needs = frozenset({"probs"})

    def __init__(self) -> None:
        super().__init__()
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_call(self, call: AttentionCall) -> None:
        b = call.query.shape[0]
        keep = slice(b // 2, b)
        # Tiny budget: several row chunks per call.
        chunks = [c.clone() for _, c in call.iter_probs(4096, batch=keep)]
        self.pairs.append((torch.cat(chunks, dim=-2), call.probs[keep].clone()))


@pytest.mark.parametrize("family", ["sd15", "pixart", "classic"])
def test_iter_probs_for_some_batch_items_matches_full_probs(family: str) -> None:
    # pixart carries a text mask with a batch axis; classic precomputes probs natively.
    model, inputs = FAMILIES[family]()
    tracer = Tracer()
    obs = tracer.add(_ChunkedCondHalf())
    with tracer.attach(model):
        run(model, inputs)
    assert obs.pairs
    for chunked, full in obs.pairs:
        assert chunked.shape == full.shape
        torch.testing.assert_close(chunked, full, atol=1e-6, rtol=0)
