"""Generations: `tracer.attach(pipe)` learns each `pipe(...)` call (prompts, tokenizers, CFG layout, images),
steps restart at 0, results are kept apart, `reset()` clears, and the pipeline class comes back exactly."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from attntrace import ConfigError, Observer, Tracer
from attntrace.core.generation import Generation
from tests import tiny_pipes as pipes


class Recorder(Observer):
    """Records the life cycle: generations, steps of each call, step-end latents."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[Any, ...]] = []
        self.calls = 0

    def on_call(self, call: Any) -> None:
        self.calls += 1

    def on_generation_start(self, generation: Generation) -> None:
        self.events.append(("start", generation))

    def on_step_end(self, step: int) -> None:
        self.events.append(("step", step))

    def on_generation_end(self, generation: Generation, images: Any | None) -> None:
        self.events.append(("end", generation.index, images))

    def result(self) -> int:
        return self.calls

    def reset(self) -> None:
        self.calls = 0

    def generations(self) -> list[Generation]:
        return [e[1] for e in self.events if e[0] == "start"]

    def steps(self) -> list[list[int]]:
        out: list[list[int]] = []
        inside = False
        for e in self.events:
            if e[0] in ("start", "end"):
                inside = e[0] == "start"
                out += [[]] if inside else []
            elif e[0] == "step" and inside:
                out[-1].append(e[1])
        return out


class Blender(Observer):
    """Changes latents at each step end (as LocalBlend does): adds the step number."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def on_latents(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        self.seen.append(step)
        return latents + 0.0


@pytest.fixture(scope="module")
def sd() -> Any:
    return pipes.sd15()


KW = {"num_inference_steps": 2, "height": 64, "width": 64, "output_type": "pt"}


def test_pipeline_call_is_a_generation_and_class_is_restored(sd: Any) -> None:
    cls = type(sd)
    untraced = sd("a red dog", generator=torch.Generator().manual_seed(0), **KW).images
    tracer = Tracer()
    rec = tracer.add(Recorder(), match="*attn2")
    with tracer.attach(sd):
        assert type(sd) is not cls and isinstance(sd, cls) and type(sd).__name__ == cls.__name__
        traced = sd("a red dog", generator=torch.Generator().manual_seed(0), **KW).images
        sd(["a cat", "a dog"], negative_prompt=["blue", "red"], num_images_per_prompt=2, guidance_scale=1.0, **KW)
    assert type(sd) is cls and "__call__" not in vars(sd)
    assert torch.equal(untraced, traced)  # passive: bit-identical
    g0, g1 = rec.generations()
    assert (g0.index, g0.prompts, g0.negative_prompts, g0.cfg, g0.num_steps) == (0, ("a red dog",), ("",), True, 2)
    assert g0.tokenizers == (sd.tokenizer,) and g0.text_layout == ((0, 0, 77),)
    # num_images_per_prompt: each prompt's copies together (diffusers' order); guidance 1.0: no CFG batch
    assert g1.prompts == ("a cat", "a cat", "a dog", "a dog") and g1.negative_prompts == ("blue", "blue", "red", "red")
    assert g1.cfg is False and g1.cond_rows(4) == slice(0, 4)
    assert rec.steps() == [[0, 1], [0, 1]]  # steps restart at 0 for every generation
    ends = [e for e in rec.events if e[0] == "end"]
    assert [e[1] for e in ends] == [0, 1] and torch.equal(ends[0][2], traced)  # output images handed over
    assert tracer.generations == [g0, g1]


def test_results_per_generation_and_reset(sd: Any) -> None:
    tracer = Tracer()
    rec = tracer.add(Recorder(), match="*attn2")
    with tracer.attach(sd) as att:
        sd("a cat", **KW)
        first = rec.calls
        sd("a cat", **KW)
        assert [r["results"]["recorder"] for r in tracer.generation_results()] == [first, 2 * first]
        assert tracer.results(generation=0) == {"recorder": first}
        with pytest.raises(ConfigError, match="no generation 5"):
            tracer.results(generation=5)
        tracer.reset()
        assert tracer.generations == [] and tracer.generation_results() == [] and rec.calls == 0
        assert tracer.attachment is att  # still attached
        sd("a cat", **KW)
        assert tracer.generations[0].index == 0 and rec.calls == first and rec.steps()[-1] == [0, 1]


def test_step_end_latents_compose_with_user_callback(sd: Any) -> None:
    tracer = Tracer()
    blend = tracer.add(Blender())
    seen: list[tuple[int, list[str]]] = []

    def user(pipe: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
        seen.append((i, sorted(kw)))
        return {"prompt_embeds": kw["prompt_embeds"]}

    with tracer.attach(sd):
        sd("a cat", callback_on_step_end=user, callback_on_step_end_tensor_inputs=["prompt_embeds"], **KW)
        sd("a cat", **KW)  # no user callback: ours alone
    assert seen == [(0, ["prompt_embeds"]), (1, ["prompt_embeds"])]  # the user's inputs, not ours
    assert blend.seen == [0, 1, 0, 1]


def _first_inputs(pipe: Any, prompts: list[str], tracer: Tracer | None, group: bool) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    try:
        if tracer is None:
            pipe(prompts, generator=torch.Generator().manual_seed(3), **KW)
        else:
            with tracer.attach(pipe), tracer.edit_group(group):
                pipe(prompts, generator=torch.Generator().manual_seed(3), **KW)
    finally:
        hook.remove()
    return seen[0]


def test_edit_group_shares_source_latents(sd: Any) -> None:
    tracer = Tracer()
    rec = tracer.add(Recorder(), match="*attn2")
    grouped = _first_inputs(sd, ["a cat", "a dog"], tracer, True)
    assert rec.generations()[0].group == (0, 1)
    plain = _first_inputs(sd, ["a cat", "a dog"], None, False)
    # [uncond cat, uncond dog, cond cat, cond dog]: every row starts from the source's (first) noise
    assert not torch.equal(plain[0], plain[1])
    for row in grouped:
        assert torch.equal(row, plain[0])
    assert torch.equal(_first_inputs(sd, ["a cat", "a dog"], tracer, False), plain)  # edit_group(False): untouched
    with tracer.attach(sd), tracer.edit_group(), pytest.raises(ConfigError, match="at least one edited prompt"):
        sd("a cat", **KW)


def test_bare_model_generations(sd: Any) -> None:
    unet = sd.unet
    x, t, emb = torch.randn(2, 4, 8, 8), torch.tensor(10), torch.randn(2, 77, 32)
    tracer = Tracer()
    rec = tracer.add(Recorder(), match="*attn2")
    with tracer.attach(unet, generation_per_call=True), torch.no_grad():
        unet(x, t, encoder_hidden_states=emb)
        unet(x, t, encoder_hidden_states=emb)
    assert rec.steps() == [[0], [0]] and [g.prompts for g in rec.generations()] == [("", ""), ("", "")]
    rec2 = Tracer()
    r2 = rec2.add(Recorder(), match="*attn2")
    with rec2.attach(unet), torch.no_grad():
        with rec2.generation(["a", "b"], cfg=False, group=[0, 1]):
            unet(x, t, encoder_hidden_states=emb)
            unet(x, t, encoder_hidden_states=emb)
        unet(x, t, encoder_hidden_states=emb)  # outside: no generation, steps go on
    assert r2.steps()[0] == [0, 1] and r2.generations()[0].group == (0, 1)


@pytest.mark.parametrize(
    ("name", "kw", "layout", "cfg"),
    [
        ("sdxl", {"height": 32, "width": 32}, ((0, 0, 77),), True),
        ("sd3", {"height": 32, "width": 32, "max_sequence_length": 16}, ((0, 0, 77), (2, 77, 16)), True),
        ("flux", {"height": 32, "width": 32, "max_sequence_length": 16}, ((1, 0, 16),), False),
        ("pixart", {"height": 64, "width": 64, "use_resolution_binning": False}, ((0, 0, 120),), True),
    ],
)
def test_families(name: str, kw: dict[str, Any], layout: Any, cfg: bool) -> None:
    pipe = getattr(pipes, name)()
    cls = type(pipe)
    tracer = Tracer()
    rec = tracer.add(Recorder())
    with tracer.attach(pipe), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no layout warning on these
        out = pipe(["a red dog", "a cat"], num_inference_steps=2, output_type="pt", **kw)
    assert type(pipe) is cls
    (g,) = rec.generations()
    assert g.prompts == ("a red dog", "a cat") and g.text_layout == layout and g.cfg is cfg
    assert len(g.tokenizers) == {"sdxl": 2, "sd3": 3, "flux": 2, "pixart": 1}[name]
    assert rec.steps() == [[0, 1]] and rec.calls > 0
    assert torch.equal(rec.events[-1][2], out.images)


def test_video_pipeline_frames() -> None:
    pipe = pipes.wan()
    tracer = Tracer()
    rec = tracer.add(Recorder())
    with tracer.attach(pipe), pytest.warns(RuntimeWarning, match="separate forwards"):
        out = pipe("a red dog", num_inference_steps=2, height=16, width=16, num_frames=5, max_sequence_length=16,
                   output_type="pt")  # fmt: skip
    (g,) = rec.generations()
    assert g.cfg is False and g.text_layout == ((0, 0, 16),)
    assert torch.equal(rec.events[-1][2], out.frames)
