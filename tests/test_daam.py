"""`heatmap` in DAAM mode equals DAAM 0.2's word heat maps, computed here from DAAM's definitions.

The reference is a diffusers attention processor on the cross-attention of every transformer block of
the UNet's down and up blocks (DAAM's locator: the mid block is left out). It computes probabilities
the classic way (`get_attention_scores`, as DAAM's processor does), keeps the conditional half, and adds
each head's (tokens, h, w) maps into a sum per (size factor, layer, head) over the steps. The global
map upsamples each sum bicubically to DAAM's grid (64 for 512/1024-px models, else 96), clamps it at
0, averages all of them and keeps the prompt's tokens plus start and end; a word's map is the mean of
the maps of its tokens (found as a run of the prompt's tokens, every occurrence).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attntrace import Tracer
from attntrace.core.errors import RunError
from attntrace.core.generation import Generation
from attntrace.core.words import WordError
from attntrace.observers.heatmap import Heatmap
from tests import sd_pipes

PROMPT = "a red dog sitting on grass"
STEPS = 6


class DaamReference:
    """Collects cross-attention maps the DAAM way; one shared object, one processor per located layer."""

    def __init__(self, pipe: Any) -> None:
        side = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.latent_hw = 4096 if side in (512, 1024) else 9216
        self.sums: dict[tuple[int, int, int], torch.Tensor] = {}
        self.layers = [
            block.attn2
            for part in (pipe.unet.up_blocks, pipe.unet.down_blocks)
            for unet_block in part if "CrossAttn" in type(unet_block).__name__
            for transformer in unet_block.attentions for block in transformer.transformer_blocks
        ]  # fmt: skip

    def processor(self, layer: int) -> Any:
        def run(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: Any = None, **_: Any) -> torch.Tensor:  # fmt: skip
            q = attn.head_to_batch_dim(attn.to_q(hidden_states))
            k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
            v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
            probs = attn.get_attention_scores(q, k, None)  # (batch * heads, pixels, tokens)
            factor = int(math.sqrt(self.latent_hw // probs.shape[1]))
            if probs.shape[-1] == 77 and factor != 8:
                side = int(math.sqrt(probs.shape[1]))
                cond = probs[probs.shape[0] // 2 :]  # the conditional image's heads
                for head, m in enumerate(cond.permute(0, 2, 1).reshape(cond.shape[0], 77, side, side)):
                    key = (factor, layer, head)
                    self.sums[key] = self.sums.get(key, 0) + m.float()
            out = attn.batch_to_head_dim(torch.bmm(probs, v))
            return attn.to_out[1](attn.to_out[0](out))

        return run

    def global_map(self, tokenizer: Any, prompt: str) -> torch.Tensor:
        x = int(math.sqrt(self.latent_hw))
        ups = [F.interpolate(m.unsqueeze(1), size=(x, x), mode="bicubic").clamp_(min=0) for m in self.sums.values()]
        maps = torch.stack(ups).mean(0)[:, 0]
        return maps[: len(tokenizer.tokenize(prompt)) + 2]

    @staticmethod
    def word_map(tokenizer: Any, prompt: str, maps: torch.Tensor, word: str) -> torch.Tensor:
        tokens = [t.replace("</w>", "") for t in tokenizer.tokenize(prompt.lower())]
        wanted = [t.replace("</w>", "") for t in tokenizer.tokenize(word.lower())]
        idx = [s + i + 1 for s in range(len(tokens)) if tokens[s : s + len(wanted)] == wanted
               for i in range(len(wanted))]  # fmt: skip
        assert idx, word
        return maps[idx].mean(0)


def generate(pipe: Any, prompt: str | list[str] = PROMPT) -> Any:
    n = 1 if isinstance(prompt, str) else len(prompt)
    with torch.no_grad():
        return pipe(prompt, latents=sd_pipes.latents(pipe, n), num_inference_steps=STEPS, guidance_scale=7.5,
                    output_type="pil").images  # fmt: skip


def daam_reference(pipe: Any) -> tuple[DaamReference, torch.Tensor]:
    ref = DaamReference(pipe)
    saved = pipe.unet.attn_processors
    procs = dict(saved)
    located = {id(m): i for i, m in enumerate(ref.layers)}
    for name, module in pipe.unet.named_modules():
        if id(module) in located:
            procs[f"{name}.processor"] = ref.processor(located[id(module)])
    pipe.unet.set_attn_processor(procs)
    try:
        generate(pipe)
    finally:
        pipe.unet.set_attn_processor(saved)
    return ref, ref.global_map(pipe.tokenizer, PROMPT)


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().double().numpy(), b.flatten().double().numpy())[0, 1])


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def case(request: pytest.FixtureRequest) -> dict[str, Any]:
    torch.set_num_threads(2)
    pipe = getattr(sd_pipes, request.param)()
    ref, ref_maps = daam_reference(pipe)
    tracer = Tracer()
    hm = tracer.add("heatmap", match="*attn2", kind="cross", mode="daam", resolution=96)
    with tracer.attach(pipe.unet):
        images = generate(pipe)
    hm.set_prompt(pipe.tokenizer, PROMPT)
    hm.set_image(images[0])
    return {"pipe": pipe, "ref": ref, "ref_maps": ref_maps, "hm": hm, "images": images, "name": request.param}


@pytest.mark.parametrize("word", ["dog", "red", "grass", "sitting", "red dog"])
def test_word_maps_correlate_with_daam(case: dict[str, Any], word: str) -> None:
    pipe, hm = case["pipe"], case["hm"]
    want = DaamReference.word_map(pipe.tokenizer, PROMPT, case["ref_maps"], word)
    got = hm.word(word)
    assert got.value.shape == want.shape == (96, 96)
    c = corr(got.value, want)
    print(f"{case['name']} {word!r}: correlation {c:.6f}, max rel diff "
          f"{float((got.value - want).abs().max() / want.abs().max()):.2e}")  # fmt: skip
    assert c >= 0.999
    # Same scale as DAAM's (sums over steps, mean over layers and heads), not only the same shape.
    torch.testing.assert_close(got.value, want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))


def test_global_map_and_layers_as_daam(case: dict[str, Any]) -> None:
    hm, ref_maps = case["hm"], case["ref_maps"]
    res = hm.result()
    assert res["mode"] == "daam"
    n = ref_maps.shape[0]
    c = corr(res["maps"][0, :n], ref_maps)
    assert c >= 0.999, c
    # The mid block is left out, every head of every located layer is kept apart.
    assert all("mid_block" not in site for site in hm.head_sums)
    assert len(hm.head_sums) == len(case["ref"].layers)
    assert sum(e[0].shape[1] for e in hm.head_sums.values()) == len(case["ref"].sums)
    # Normalised by the prompt's tokens, as DAAM's `normalize=True`.
    norm = ref_maps / (ref_maps[1:-1].sum(0, keepdim=True) + 1e-6)
    want = DaamReference.word_map(case["pipe"].tokenizer, PROMPT, norm, "dog")
    assert corr(hm.word("dog", normalize=True).value, want) >= 0.999


def test_head_mean_bilinear_is_not_daam(case: dict[str, Any]) -> None:
    # The mean mode (head mean first, bilinear, coarsest grid dropped) is visibly not DAAM's map.
    if case["name"] != "sd15":
        pytest.skip("one architecture is enough")
    pipe = case["pipe"]
    tracer = Tracer()
    hm = tracer.add("heatmap", match="*attn2", kind="cross", resolution=96)
    with tracer.attach(pipe.unet):
        generate(pipe)
    hm.set_prompt(pipe.tokenizer, PROMPT)
    want = DaamReference.word_map(pipe.tokenizer, PROMPT, case["ref_maps"], "grass")
    assert corr(hm.word("grass").value, want) < 0.999


def test_default_grid_is_largest_layer_grid(case: dict[str, Any]) -> None:
    hm = Heatmap(mode="daam")
    hm.head_sums = case["hm"].head_sums
    largest = max(e[0].shape[-1] for e in hm.head_sums.values())
    assert hm.daam_size() == (largest, largest)
    assert hm.result()["maps"].shape[-2:] == (largest, largest)


def test_word_map_api(case: dict[str, Any], tmp_path: Path) -> None:
    if case["name"] != "sd15":
        pytest.skip("one architecture is enough")
    from PIL import Image

    hm, image = case["hm"], case["images"][0]
    dog = hm.word("dog")
    assert dog.tokens == [3]
    grass = hm.word("grass")
    assert len(grass.tokens) == 4  # gr + a + s + s</w>: sub-tokens merged
    big = dog.expand()
    assert big.shape == (image.size[1], image.size[0])
    assert float(big.min()) == 0.0 and abs(float(big.max()) - 1.0) < 1e-5
    assert torch.equal(dog.expand((32, 32), threshold=0.5).unique(), torch.tensor([0.0, 1.0]))
    # Opacity: alpha 0 shows the image, alpha 1 only the heat colours.
    png0 = np.asarray(Image.open(io.BytesIO(_png(dog.plot(alpha=0.0)))).convert("RGB"), dtype=float)
    png1 = np.asarray(Image.open(io.BytesIO(_png(dog.plot(alpha=1.0)))).convert("RGB"), dtype=float)
    assert np.abs(png0 - png1).mean() > 5
    shown = Image.open(io.BytesIO(dog._repr_png_()))
    assert shown.size[0] > 100
    assert "data:image/png;base64," in dog._repr_html_() and "dog" in dog._repr_html_()
    with pytest.raises(WordError, match="not in the prompt"):
        hm.word("cat")
    with pytest.raises(RunError, match="alpha"):
        dog.plot(alpha=2)
    # The grid: every word of the prompt, no start/end/padding token.
    grid = hm.words()
    assert grid.words == ["a", "red", "dog", "sitting", "on", "grass"]
    assert "<img" in grid._repr_html_()
    Image.open(io.BytesIO(grid._repr_png_())).verify()


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=50)
    return buf.getvalue()


def test_generation_labels_and_save_renders_every_item(tmp_path: Path) -> None:
    # The tracer hands each pipeline call's Generation and images over; no set_prompt needed.
    torch.set_num_threads(2)
    pipe = sd_pipes.sd15()
    prompts = ("a dog on grass", "a red dog on grass")
    gen = Generation(index=0, prompts=prompts, negative_prompts=("", ""), tokenizers=(pipe.tokenizer,), cfg=True,
                     num_steps=STEPS, group=(0, 1))  # fmt: skip
    tracer = Tracer()
    hm = tracer.add("heatmap", match="*attn2", kind="cross", mode="daam")
    with tracer.attach(pipe.unet):
        hm.on_generation_start(gen)
        images = generate(pipe, list(prompts))
        hm.on_generation_end(gen, images)
    assert hm.result()["maps"].shape[0] == 2  # both conditional images
    assert hm.words(1).words == ["a", "red", "dog", "on", "grass"]
    assert hm.word("red", item=1).tokens == [2]
    assert hm.word("dog", item=1).image is images[1]
    files = {f.name for f in hm.save(tmp_path)}
    assert {"heatmap_01_dog.png", "item1_heatmap_01_red.png", "item1_heatmap_04_grass.png"} <= files
    assert not any("startoftext" in f or "endoftext" in f for f in files)
    # A new pipeline call starts afresh (as DAAM clears its maps), unless across_generations.
    hm.on_generation_start(gen)
    assert hm.result()["maps"] is None
