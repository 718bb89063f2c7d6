"""torch.compile of a traced UNet: zero graph breaks with passive observers (Dynamo's own explanation)."""

from __future__ import annotations

import torch
import torch._dynamo as dynamo
from tiny import FAMILIES

from attntrace import AttentionCall, Observer, Tracer


class CountQ(Observer):
    needs = frozenset({"query"})

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def on_call(self, call: AttentionCall) -> None:
        self.n += 1


def test_traced_unet_compiles_without_graph_breaks() -> None:
    model, inputs = FAMILIES["sd15"]()
    tracer = Tracer({"rules": [{"use": "shapes"}]})
    counter = tracer.add(CountQ())
    dynamo.reset()
    with tracer.attach(model), torch.no_grad():
        # Dynamo's own explanation of the traced forward.
        explanation = dynamo.explain(model.forward)(**inputs, return_dict=False)
        # fullgraph=True raises at the first graph break of the compiled module.
        out = torch.compile(model, backend="eager", fullgraph=True)(**inputs, return_dict=False)[0]
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert counter.n == 2 * len(tracer.sites(model))  # observers ran in both runs
    assert tracer.observers["shapes"].result()
    with torch.no_grad():
        assert torch.equal(out, model(**inputs, return_dict=False)[0])


class StepLog(Observer):
    """Records (site, step) of every call and the query it saw: O(calls)."""

    needs = frozenset({"query", "probs"})

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, int]] = []
        self.mass: list[float] = []

    def on_call(self, call: AttentionCall) -> None:
        self.seen.append((call.site, call.step))
        self.mass.append(float(call.probs.sum()))


def test_compiled_traced_model_runs_observers_every_step_without_recompiling() -> None:
    model, inputs = FAMILIES["sd15"]()
    with torch.no_grad():
        eager_plain = model(**inputs, return_dict=False)[0]
        eager_edit = Tracer({"rules": [{"use": "reweight", "kind": "cross", "with": {"tokens": [1], "factor": 3.0}}]})
        with eager_edit.attach(model):
            eager_edited = model(**inputs, return_dict=False)[0]
    assert not torch.equal(eager_plain, eager_edited)

    tracer = Tracer({"rules": [{"use": "reweight", "kind": "cross", "with": {"tokens": [1], "factor": 3.0}}]})
    log = tracer.add(StepLog(), kind="self")
    dynamo.reset()
    counters = dynamo.utils.counters
    counters.clear()
    with tracer.attach(model) as attachment, torch.no_grad():
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        outs = [compiled(**inputs, return_dict=False)[0] for _ in range(4)]
    n_self = sum(1 for s in attachment.sites if s.kind == "self")
    # Every compiled forward ran the observers at run time, each with its own step.
    assert sorted({step for _, step in log.seen}) == [0, 1, 2, 3]
    assert len(log.seen) == 4 * n_self
    # Probability rows sum to 1: the (B, H, Lq) rows of each call.
    assert all(abs(m - round(m)) < 1e-3 for m in log.mass)
    # One compilation for four steps: the step counter is not a guard.
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    # The edit inside the compiled graph equals the eager edit; the model is restored afterwards.
    for out in outs:
        torch.testing.assert_close(out, eager_edited, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert torch.equal(model(**inputs, return_dict=False)[0], eager_plain)


def test_custom_op_matches_its_fake_implementation() -> None:
    # Inductor checks sizes and strides against the fake implementation: opcheck runs the same checks.
    from attntrace.tracing import compiled

    # A (B, H, L, D) view of a (B, L, H, D) tensor, as diffusers' processors pass it; site key 0 is no
    # site (the plain-kernel branch), whose kernel returns a non-contiguous output for this input.
    q = torch.randn(2, 1024, 8, 8).transpose(1, 2)
    k, v = torch.randn(2, 77, 8, 8).transpose(1, 2), torch.randn(2, 77, 8, 8).transpose(1, 2)
    args = (q, k, v, None, 0.0, False, None, False, 0, 0, 0, 0, 0)
    torch.library.opcheck(compiled._sdpa_op, args)
    out = torch.ops.attntrace.sdpa(*args)
    assert out.is_contiguous()
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
