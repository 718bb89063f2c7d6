"""Caching and layer-skip hooks (diffusers.hooks) on the tiny Flux pipeline, 4 steps.

Cached or skipped blocks run no attention. The kernel oracle records where attention really ran; the
tracer must see exactly those (site, step) pairs with the right step numbers, and report every other
(site, step) of a traced site as skipped (`Observer.on_skip`, `Tracer.activity()`), never by silence.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch

from attntrace import Tracer
from attntrace.observers.shapes import Shapes
from tests.runtime import harness, pipes

STEPS = 4
ALL_T = (-1, 1001)  # flow-matching timesteps are in [0, 1000]: every step is inside


def _configs() -> dict[str, Callable[[Any], Any]]:
    from diffusers.hooks import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        SeaCacheConfig,
        TaylorSeerCacheConfig,
    )

    def now(pipe: Any) -> Callable[[], Any]:
        return lambda: pipe.current_timestep

    return {
        "FirstBlockCache": lambda p: FirstBlockCacheConfig(threshold=1e9),
        "PyramidAttentionBroadcast": lambda p: PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=ALL_T,
            current_timestep_callback=now(p)),
        "FasterCache": lambda p: FasterCacheConfig(
            # The first step must compute (t=1000 is outside the range): FasterCache approximates from two
            # cached outputs and fails on a skip with an empty cache.
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 800),
            current_timestep_callback=now(p), is_guidance_distilled=True,
            attention_weight_callback=lambda _: 0.5),
        "TaylorSeer": lambda p: TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, max_order=1,
                                                      taylor_factors_dtype=torch.float32),
        "MagCache": lambda p: MagCacheConfig(threshold=1e9, max_skip_steps=2, retention_ratio=0.25,
                                             num_inference_steps=STEPS, mag_ratios=[1.0] * STEPS),
        "SeaCache": lambda p: SeaCacheConfig(threshold=1e9, retention_steps=1, cache_end_steps=0),
    }


CACHES = list(_configs())


@pytest.mark.feature("caching hooks (enable_cache)", "caching")
@pytest.mark.parametrize("name", CACHES)
def test_cache(name: str) -> None:
    """`pipe.transformer.enable_cache(<Config>)` with settings that make it skip within 4 steps; the tracer sees
    every attention call that ran, at its step, and reports the cached (site, step) pairs as skipped (took: per-site
    ran/skipped accounting, `Observer.on_skip`, `Tracer.activity()`). SeaCache skips nothing here: FluxPipeline
    0.42.1 passes no step_index/sigma to `cache_context`, so SeaCache runs fail-open (checked as such)."""
    pipe = pipes.flux()
    uncached = pipes.flux_call(pipe, steps=STEPS)
    pipe.transformer.enable_cache(_configs()[name](pipe))
    call = partial(pipes.flux_call, steps=STEPS)
    outcome = harness.check_feature(pipe, call, edit="transformer_blocks.0.attn")
    if name == "SeaCache":
        # FluxPipeline 0.42.1 does not pass step_index/sigma to `cache_context`: SeaCache runs fail-open.
        assert not outcome.skipped
        return
    assert outcome.skipped, f"{name} skipped nothing in {STEPS} steps: the test settings do not exercise it"
    assert outcome.steps == list(range(STEPS))
    assert not torch.equal(call(pipe), uncached)
    pipe.transformer.disable_cache()


@pytest.mark.feature("caching hooks (enable_cache)", "caching")
def test_shapes_reports_skipped_steps() -> None:
    """The built-in `shapes` observer says how many steps each site was skipped (a site skipped at every step it
    was due has a row with `calls: 0`), and `Tracer.activity()` lists the skipped steps."""
    from diffusers.hooks import FirstBlockCacheConfig

    pipe = pipes.flux()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))
    tracer = Tracer()
    shapes = tracer.add(Shapes())
    with tracer.attach(pipe):
        pipes.flux_call(pipe, steps=STEPS)
    rows = {r["site"]: r for r in shapes.result()}
    head, tail = "transformer_blocks.0.attn", "single_transformer_blocks.1.attn"
    assert rows[head]["calls"] == STEPS and rows[head]["steps_skipped"] == 0
    assert rows[tail]["calls"] == 1 and rows[tail]["steps_skipped"] == STEPS - 1
    activity = tracer.activity()
    assert activity[tail] == {"steps_ran": 1, "steps_skipped": STEPS - 1, "skipped_steps": [1, 2, 3]}
    assert activity[head]["steps_skipped"] == 0


@pytest.mark.feature("layer skip / smoothed-energy guidance", "caching")
@pytest.mark.parametrize("mode", ["skip_attention", "skip_attention_scores", "skip_block"])
def test_layer_skip(mode: str) -> None:
    """`apply_layer_skip(unet, LayerSkipConfig(indices=[0], fqn="down_blocks.1.attentions.0.transformer_blocks"))`
    on the SD pipeline: with `skip_attention` the self-attention processor never runs; with
    `skip_attention_scores` diffusers' `AttentionScoreSkipFunctionMode` returns `value` instead of running the
    kernel: attntrace recognises that mode and reports the site skipped instead of handing observers probabilities
    of attention that did not happen (cross-attention, whose query and value lengths differ, still runs);
    `skip_block` skips the whole block. In diffusers 0.42.1 layer skip itself fails untraced on Flux
    (`FluxAttention` has no `is_cross_attention`) and on SD3 (`JointAttnProcessor2_0` is not in its registry)."""
    from diffusers.hooks import LayerSkipConfig, apply_layer_skip

    pipe = pipes.sd()
    base = pipes.sd_call(pipe)
    kw = {"skip_attention": mode != "skip_attention_scores", "skip_ff": mode == "skip_block",
          "skip_attention_scores": mode == "skip_attention_scores"}  # fmt: skip
    block = "down_blocks.1.attentions.0.transformer_blocks"
    apply_layer_skip(pipe.unet, LayerSkipConfig(indices=[0], fqn=block, **kw))
    assert not torch.equal(pipes.sd_call(pipe), base)
    outcome = harness.check_feature(pipe, pipes.sd_call, edit="*attn2")
    skipped = {f"{block}.0.attn1", f"{block}.0.attn2"} if mode == "skip_block" else {f"{block}.0.attn1"}
    assert {s for s, _ in outcome.skipped} == skipped


@pytest.mark.feature("layer skip / smoothed-energy guidance", "caching")
def test_smoothed_energy_guidance() -> None:
    """`_apply_smoothed_energy_guidance_hook` (the SEG guider's hook) blurs the query projection of block 1 of the
    SD3 transformer: attention still runs on the blurred query; the tracer's q and probs are the blurred ones."""
    from diffusers.hooks.smoothed_energy_guidance_utils import (
        SmoothedEnergyGuidanceConfig,
        _apply_smoothed_energy_guidance_hook,
    )

    pipe = pipes.sd3()
    base = pipes.sd3_call(pipe)
    _apply_smoothed_energy_guidance_hook(pipe.transformer, SmoothedEnergyGuidanceConfig(indices=[1],
                                         fqn="transformer_blocks"), blur_sigma=2.0)  # fmt: skip
    assert not torch.equal(pipes.sd3_call(pipe), base)
    outcome = harness.check_feature(pipe, pipes.sd3_call, edit="transformer_blocks.1.attn")
    assert not outcome.skipped
