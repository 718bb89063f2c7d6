"""Regional compile (`compile_repeated_blocks`) and `torch.compile(fullgraph=True)` of traced DiTs (tiny Flux and
SD3 pipelines), with the `aot_eager` backend: Dynamo and AOTAutograd, where graph breaks and recompiles arise,
without Inductor's code generation (minutes on 2 cores). Recompiles are counted with Dynamo's counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest
import torch
import torch._dynamo as dynamo

from attntrace import Tracer
from tests.runtime import harness, pipes

pytestmark = pytest.mark.compile


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    dynamo.reset()
    dynamo.utils.counters.clear()
    yield
    dynamo.reset()


def _graphs() -> int:
    return int(dynamo.utils.counters["stats"]["unique_graphs"])


def _compile_check(
    pipe: Any, call: Callable[..., torch.Tensor], compile_fn: Callable[[Any], None], edit: str, graphs_per_attach: int
) -> None:
    eager = call(pipe, steps=3)
    edited_eager, _ = harness.oracle_run(pipe, partial(call, steps=3), edit=edit)
    compile_fn(pipe)
    compiled = call(pipe, steps=3)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    before = harness.pipeline_state(pipe)
    untraced_graphs = _graphs()

    tracer = Tracer()
    rec = tracer.add(harness.Recorder())
    with tracer.attach(pipe):
        out1 = call(pipe, steps=1)
        graphs = _graphs()  # attaching swaps processors: one recompile per compiled code, once
        assert graphs - untraced_graphs <= graphs_per_attach, "a recompile per block"
        out3 = call(pipe, steps=3)
        assert _graphs() == graphs, "a recompile per step"
    assert torch.equal(out3, compiled)
    assert out1.shape == compiled.shape
    sites = {s.name for s in tracer.sites(pipe)}
    # Each pipe(...) call is one generation whose steps restart at 0: step 0 of both calls, then steps 1-2.
    assert set(rec.seen) == {(s, t) for s in sites for t in range(3)}
    assert all(n == (2 if t == 0 else 1) for (_, t), n in rec.seen.items())
    assert rec.max_err < 1e-5
    changed = harness.diff(before, harness.pipeline_state(pipe))
    assert not changed, changed

    editor = Tracer()
    editor.add(harness.Halve(), match=edit)
    with editor.attach(pipe):
        edited = call(pipe, steps=3)
    torch.testing.assert_close(edited, edited_eager, rtol=1e-5, atol=1e-6)
    assert not torch.equal(edited, compiled)
    assert torch.equal(call(pipe, steps=3), compiled)  # detached: the compiled model as before


def _regional(pipe: Any) -> None:
    pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="aot_eager")


def _whole(pipe: Any) -> None:
    pipe.transformer.compile(fullgraph=True, backend="aot_eager")


@pytest.mark.feature("compile_repeated_blocks (regional compile)", "compile")
def test_regional_compile_flux() -> None:
    """`transformer.compile_repeated_blocks(fullgraph=True)` on Flux, then attach: no graph break, one recompile
    when attaching (the processors change) and none per step; observers see every call of every compiled step;
    a compiled edit equals the eager one. It took a fix: Flux's `query.unflatten(...)` under attntrace's
    torch-function mode was a Dynamo error under fullgraph (Dynamo cannot trace `Tensor.unflatten`'s `super()`
    call); while compiling the mode now calls `torch.unflatten`. And two guards made each block of the shared
    compiled block recompile (past Dynamo's recompile limit of 8 on a real Flux): the site key the compiled op
    carries is now a tensor input, and the joint-token order is noted without reading its previous value."""
    _compile_check(pipes.flux(), pipes.flux_call, _regional, edit="single_transformer_blocks.0.attn",
                   graphs_per_attach=2)  # fmt: skip


@pytest.mark.feature("torch.compile(fullgraph=True) of a traced DiT", "compile")
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_fullgraph_compile(family: str) -> None:
    """`transformer.compile(fullgraph=True)` (whole model, in place) on Flux and SD3, then attach; same checks."""
    build, call = pipes.PIPES[family]
    _compile_check(build(), call, _whole, edit="transformer_blocks.0.attn", graphs_per_attach=1)


@pytest.mark.feature("torch.compile(fullgraph=True) of a traced DiT", "compile")
def test_attach_after_torch_compile_wrapper() -> None:
    """`pipe.transformer = torch.compile(pipe.transformer)` (an `OptimizedModule`) and then attach: the sites keep
    their names (not `_orig_mod.`-prefixed) and are traced."""
    pipe = pipes.flux()
    eager = pipes.flux_call(pipe)
    pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, backend="aot_eager")
    tracer = Tracer()
    rec = tracer.add(harness.Recorder(), match="transformer_blocks.*")
    with tracer.attach(pipe):
        out = pipes.flux_call(pipe)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    assert {s for s, _ in rec.seen} == {"transformer_blocks.0.attn", "transformer_blocks.1.attn"}
