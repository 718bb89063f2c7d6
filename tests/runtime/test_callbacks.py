"""`callback_on_step_end` with the tracer attached: the user's callbacks run as they do untraced, and the
tracer's step numbering follows the denoiser's forwards (attntrace on main injects no step-end callback of
its own: steps come from forward hooks on the denoiser, so nothing has to be composed with the user's).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import torch

from attntrace import Tracer
from tests.runtime import harness, pipes


class Log:
    """A user callback that records (step, timestep) and scales the latents at step 0 (changes the result)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, float]] = []

    def __call__(self, pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((i, float(t)))
        return {"latents": kwargs["latents"] * 0.9} if i == 0 else {}


@pytest.mark.feature("callback_on_step_end chains", "callbacks")
def test_user_callback_runs_and_steps_match() -> None:
    """A user callback editing the latents (`callback_on_step_end_tensor_inputs=["latents"]`): the traced run
    equals the untraced one with the same callback, the callback sees the same (step, timestep) sequence, and the
    tracer's steps are the pipeline's steps."""
    pipe = pipes.sd()
    plain = pipes.sd_call(pipe)
    untraced, traced = Log(), Log()
    ref = pipes.sd_call(pipe, callback_on_step_end=untraced, callback_on_step_end_tensor_inputs=["latents"])
    assert not torch.equal(ref, plain)
    tracer = Tracer()
    rec = tracer.add(harness.Recorder(), match="*attn2")
    with tracer.attach(pipe):
        out = pipes.sd_call(pipe, callback_on_step_end=traced, callback_on_step_end_tensor_inputs=["latents"])
    assert torch.equal(out, ref)
    assert traced.calls == untraced.calls
    assert {t for _, t in rec.seen} == {i for i, _ in traced.calls}
    harness.check_feature(pipe, partial(pipes.sd_call, callback_on_step_end=Log(),
                                        callback_on_step_end_tensor_inputs=["latents"]), edit="*attn2")  # fmt: skip


@pytest.mark.feature("callback_on_step_end chains", "callbacks")
def test_cfg_cutoff_and_multi_callbacks() -> None:
    """diffusers' own `SDCFGCutoffCallback` (drops the unconditional half after half of the steps, so the batch
    shrinks from 2 to 1 mid-run) chained with a user callback through `MultiPipelineCallbacks`: transparent, the
    (site, step) pairs equal the kernel oracle's, edits and detach as everywhere."""
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback, SDCFGCutoffCallback

    pipe = pipes.sd()
    log = Log()

    class LogCallback(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, p: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            kwargs.update(log(p, i, t, kwargs))  # chained callbacks hand the whole dict on
            return kwargs

    def call(p: Any) -> torch.Tensor:
        chain = MultiPipelineCallbacks([SDCFGCutoffCallback(cutoff_step_ratio=0.5), LogCallback()])
        return pipes.sd_call(p, num_inference_steps=4, callback_on_step_end=chain)

    outcome = harness.check_feature(pipe, call, edit="*attn1")
    assert outcome.steps == [0, 1, 2, 3]
    assert {i for i, _ in log.calls} == {0, 1, 2, 3}


@pytest.mark.feature("callback_on_step_end chains", "callbacks")
def test_interrupt_from_callback() -> None:
    """A callback setting `pipe._interrupt = True` at step 1 of 4 (diffusers' interruption): the loop skips the
    remaining steps; the tracer saw steps 0 and 1 only and the pipeline is left as it was."""
    pipe = pipes.sd()

    def stop(p: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if i == 1:
            p._interrupt = True
        return {}

    def call(p: Any) -> torch.Tensor:
        return pipes.sd_call(p, num_inference_steps=4, callback_on_step_end=stop)

    outcome = harness.check_feature(pipe, call, edit="*attn2")
    assert outcome.steps == [0, 1]
