"""`attntrace report`: the static explorer, checked in real headless Chromium (Debian's package, driven by
Playwright) on real runs of the demo pipeline and of MiniLM. A screenshot of each view is kept under
`runs/ci-artifacts/` (gitignored) as a CI artifact."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("diffusers")

from attntrace.experiment.runner import run_experiment
from attntrace.experiment.spec import Experiment
from attntrace.report.html import write_report

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "runs" / "ci-artifacts"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, demo_pipeline_dir: Path) -> Path:
    from attntrace.demo import minilm_path

    tmp = tmp_path_factory.mktemp("explorer")
    pipe = demo_pipeline_dir
    run_experiment(Experiment.from_data({
        "name": "pipe",
        "model": {"pipeline": "StableDiffusionPipeline", "path": str(pipe), "dtype": "float32", "device": "cpu"},
        "inputs": {"prompts": ["a cat sitting on a mat", "a red house by the sea"], "steps": 3,
                   "height": 64, "width": 64, "pipeline_kwargs": {"num_images_per_prompt": 2}},
        "trace": {"rules": [{"use": "heatmap", "match": "*attn2"},
                            {"use": "attnmaps", "match": "*attn2", "with": {"heads": True, "resolution": 16}},
                            {"use": "stats", "match": "*"}, {"use": "shapes"}]},
        "output": str(tmp / "runs" / "pipe"),
    }), progress=False)  # fmt: skip
    mpath = minilm_path()
    if mpath is not None:
        run_experiment(Experiment.from_data({
            "name": "text",
            "model": {"pipeline": "AutoModel", "path": str(mpath), "device": "cpu"},
            "inputs": {"texts": ["The cat sat on the mat because it was warm."]},
            "trace": {"rules": [{"use": "attnmaps", "with": {"heads": True}}, {"use": "stats"}]},
            "output": str(tmp / "runs" / "text"),
        }), progress=False)  # fmt: skip
    write_report(tmp / "runs")
    return tmp / "runs"


def _payload(index: Path) -> dict[str, Any]:
    m = re.search(r'<script type="application/json" id="attntrace-data">(.*?)</script>', index.read_text(), re.S)
    assert m
    return json.loads(m.group(1).replace("<\\/", "</"))


def _u8(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype=np.uint8)


def _f32(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype=np.float32)


def test_page_is_self_contained_and_maps_are_the_saved_ones(runs: Path) -> None:
    from safetensors.numpy import load_file

    page = (runs / "index.html").read_text()
    assert not re.search(r"""(src|href)=["']https?://""", page)  # nothing from the network
    assert re.search(r"<img[^>]+src=\"[^d]", page) is None  # no image file references: all embedded
    data = _payload(runs / "index.html")
    run = next(r for r in data["runs"] if r["name"] == "pipe")
    assert run["dir"] == "pipe" and len(run["items"]) == 2
    item = run["items"][0]
    hm = item["heatmaps"][0]
    assert hm["words"] == ["a", "cat", "sitting", "on", "a", "mat"]  # words, not special or padding tokens
    # Independent expectation: the saved token maps summed per word (CLIP positions 1..6), then 8-bit.
    saved = load_file(str(runs / "pipe" / "items" / item["id"] / "heatmap" / "heatmap.safetensors"))["maps"]
    want = np.stack([saved[0, i] for i in range(1, 7)])
    got = _u8(hm["data"]).reshape(hm["shape"])[0].astype(np.float32)
    lo, hi = _f32(hm["lo"]), _f32(hm["hi"])
    got = lo[:6, None, None] + got / 255 * (hi - lo)[:6, None, None]
    assert np.abs(got - want).max() <= (want.max() - want.min()) / 255 + 1e-6
    am = item["attnmaps"][0]
    assert am["kind"] == "image" and am["steps"] == [0, 1, 2] and am["heads"] and am["shape"][-1] == 16
    st = item["stats"][0]
    assert len(st["series"]) == 14 and set(st["blocks"]) >= {"down_blocks.0", "mid_block", "up_blocks.1"}
    assert item["shapes"][0]["rows"] and item["images"][0].startswith("data:image/png;base64,")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("needs /usr/bin/chromium (run .ci/setup-chromium.sh)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install -e '.[test]')")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


class Page:
    """A page with every console error and uncaught exception collected."""

    def __init__(self, browser: Any, url: str) -> None:
        self.errors: list[str] = []
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.goto(url)
        self.page.wait_for_selector("body[data-ready='1']", timeout=15000)

    def pixels(self, selector: str, n: int = 0) -> str:
        """The n-th matching canvas's pixels (after its image decoded and the map was drawn)."""
        self.page.wait_for_timeout(150)
        return self.page.eval_on_selector_all(selector, "(els, n) => els[n].toDataURL()", n)

    def tab(self, name: str) -> None:
        self.page.click(f"nav.tabs button[data-tab={name}]")
        self.page.wait_for_timeout(100)

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"explorer-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


def test_explorer_in_headless_chromium(runs: Path, browser: Any) -> None:
    pg = Page(browser, (runs / "index.html").as_uri())
    page = pg.page
    # every embedded image decodes to real pixels
    sizes = page.evaluate("""() => Promise.all(JSON.parse(document.getElementById('attntrace-data').textContent)
        .runs.flatMap(r => r.items.flatMap(i => i.images)).map(u => {
            const im = new Image(); im.src = u; return im.decode().then(() => im.naturalWidth); }))""")
    assert len(sizes) == 4 and all(s == 64 for s in sizes)
    # no stray navigation links and no file paths as captions
    assert page.eval_on_selector_all("a", "els => els.filter(a => a.textContent.trim() === '.').length") == 0

    # heat maps: words as buttons, a labelled canvas; word and opacity change what is shown
    assert page.locator("#words button").all_inner_texts() == ["a", "cat", "sitting", "on", "a", "mat"]
    caption = page.locator("#heat-views figcaption").first.inner_text()
    assert "word \u201ca\u201d" in caption and ".png" not in caption
    before = pg.pixels("#heat-views canvas")
    page.click("#words button[data-word='1']")
    after_word = pg.pixels("#heat-views canvas")
    assert after_word != before and "word \u201ccat\u201d" in page.locator("#heat-views figcaption").first.inner_text()
    page.fill("#alpha", "0.9")
    page.dispatch_event("#alpha", "input")
    assert pg.pixels("#heat-views canvas") != after_word
    # every image of the item (num_images_per_prompt: 2), each with its own map
    figs = page.locator("#heat-views .col").first.locator("figcaption").all_inner_texts()
    assert [f.split(" \u00b7 ")[0] for f in figs] == ["image 0", "image 1"]
    assert pg.pixels("#heat-views canvas", 0) != pg.pixels("#heat-views canvas", 1)
    # items side by side
    page.select_option("#itemB", index=2)
    assert page.locator("#heat-views .col").count() == 2
    assert "a red house by the sea" in page.locator("#heat-views .col h3").nth(1).inner_text()
    pg.shot("heatmaps")

    # steps and layers: the step range, the layer and the head each change the map
    pg.tab("steps")
    first = pg.pixels("#steps-views canvas")
    page.fill("#stepFrom", "2")
    page.dispatch_event("#stepFrom", "input")
    late = pg.pixels("#steps-views canvas")
    assert late != first and "steps 2\u20132" in page.locator("#steps-views figcaption").first.inner_text()
    groups = page.locator("#group option").all_inner_texts()
    assert groups[0] == "all layers" and "mid_block" in groups
    page.select_option("#group", label="mid_block")
    by_layer = pg.pixels("#steps-views canvas")
    assert by_layer != late
    page.select_option("#head", label="head 1")
    assert pg.pixels("#steps-views canvas") != by_layer
    pg.shot("steps")

    # statistics: every line in the legend (14 > 12), hover labels, per-block grouping, metric choice
    pg.tab("stats")
    legend = page.locator("#stats-views .legend").first.locator("div")
    assert legend.count() == 14
    line = page.locator("#stats-views svg").first.locator("polyline").first
    name = line.get_attribute("data-series")
    box = page.locator("#stats-views svg").first.bounding_box()
    pts = [tuple(map(float, p.split(","))) for p in line.get_attribute("points").split()]
    page.mouse.move(box["x"] + pts[1][0], box["y"] + pts[1][1])
    tip = page.locator("#tooltip")
    assert tip.is_visible() and "step 1" in tip.inner_text() and "entropy = " in tip.inner_text()
    assert page.locator("#stats-views svg").first.locator("polyline").count() == 14
    entropy_points = line.get_attribute("points")
    page.select_option("#metric", label="max")
    same_line = page.locator(f"#stats-views svg polyline[data-series='{name}']").first
    assert same_line.get_attribute("points") != entropy_points
    page.select_option("#grouping", value="block")
    blocks = page.locator("#stats-views .legend").first.locator("div").all_inner_texts()
    assert len(blocks) == 5 and any(b.startswith("mid_block (2 sites)") for b in blocks)
    page.locator("#stats-views .legend").first.locator("div").first.click()  # hide a line
    assert page.locator("#stats-views svg").first.locator("polyline").count() == 4
    pg.shot("stats")

    # shapes: the table of the shapes observer
    pg.tab("shapes")
    shapes = json.loads((runs / "pipe" / "items" / "p000-s0" / "shapes" / "shapes.json").read_text())
    assert page.locator("#shapes-views table").first.locator("tr").count() == len(shapes) + 1
    pg.tab("items")
    assert page.locator("#items-views table tr").count() == 3

    if any(r["name"] == "text" for r in _payload(runs / "index.html")["runs"]):
        page.select_option("#run", label="text (text)")
        assert page.locator("nav.tabs button[data-tab=heat]").is_disabled()
        pg.tab("tokens")
        labels_ok = page.evaluate("() => document.querySelectorAll('#tokens-views canvas').length")
        assert labels_ok == 1
        mean = pg.pixels("#tokens-views canvas")
        page.select_option("#tokGroup", index=3)
        layer3 = pg.pixels("#tokens-views canvas")
        assert layer3 != mean and "encoder.layer.3" in page.locator("#tokens-views figcaption").inner_text()
        page.select_option("#tokHead", label="head 2")
        assert pg.pixels("#tokens-views canvas") != layer3
        pg.shot("tokens")
        pg.tab("stats")  # one forward: bars over layers, not lines over a one-point step axis
        svg = page.locator("#stats-views svg").first
        assert svg.locator("polyline").count() == 0 and svg.locator("rect[data-series]").count() == 6
        assert "layer" in svg.text_content() and "denoising step" not in svg.text_content()
    assert pg.errors == [], pg.errors
    shot = pg.shot("final")
    print(f"explorer screenshots: {ARTIFACTS} (e.g. {shot})")


GROUP = ["a red circle", "a blue circle", "a big blue circle"]  # source, word swap, swap with one more word


@pytest.fixture(scope="module")
def group_run(tmp_path_factory: pytest.TempPathFactory, demo_pipeline_dir: Path) -> Path:
    tmp = tmp_path_factory.mktemp("group")
    run_experiment(Experiment.from_data({
        "name": "group",
        "model": {"pipeline": "StableDiffusionPipeline", "path": str(demo_pipeline_dir), "device": "cpu"},
        "inputs": {"prompts": [GROUP], "steps": 2, "height": 64, "width": 64},
        "trace": {"rules": [{"use": "heatmap", "match": "*attn2"},
                            {"use": "attnmaps", "match": "*attn2", "with": {"resolution": 8}}]},
        "output": str(tmp / "group"),
    }), progress=False)  # fmt: skip
    write_report(tmp / "group")
    return tmp / "group"


def test_edit_group_images_have_their_own_words(group_run: Path, demo_pipeline_dir: Path) -> None:
    """Each image of an edit group gets its own prompt's words, with the saved maps of its own tokens."""
    from safetensors.numpy import load_file
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(demo_pipeline_dir, subfolder="tokenizer")
    (item,) = _payload(group_run / "index.html")["runs"][0]["items"]
    assert item["prompts"] == GROUP
    hm, am = item["heatmaps"][0], item["attnmaps"][0]
    words = [p.split() for p in GROUP]
    assert hm["row_words"] == am["row_words"] == words and hm["words"] == words[0]
    saved = load_file(str(group_run / "items" / item["id"] / "heatmap" / "heatmap.safetensors"))["maps"]
    rows, width = hm["shape"][:2]
    q = _u8(hm["data"]).reshape(hm["shape"]).astype(np.float32)
    lo, hi = _f32(hm["lo"]).reshape(rows, width), _f32(hm["hi"]).reshape(rows, width)
    for r, prompt in enumerate(GROUP):
        # Independent token positions: each word tokenised alone (this small vocabulary splits some words),
        # after the start token; a word's map is the sum of its tokens' maps.
        spans, at = [], 1
        for word in prompt.split():
            n = len(tok.tokenize(word))
            spans.append(list(range(at, at + n)))
            at += n
        assert at == len(tok(prompt)["input_ids"]) - 1
        for w, span in enumerate(spans):
            want = saved[r, span].sum(axis=0)
            got = lo[r, w] + q[r, w] / 255 * (hi[r, w] - lo[r, w])
            assert np.abs(got - want).max() <= (want.max() - want.min()) / 255 + 1e-6, (prompt, w)
    # the swapped word of image 1 is its own "blue", not the source's "red"
    assert hm["row_words"][1][1] == "blue" and "red" not in hm["row_words"][1]


def test_edit_group_word_buttons_in_chromium(group_run: Path, browser: Any) -> None:
    pg = Page(browser, (group_run / "index.html").as_uri())
    page = pg.page
    assert page.locator("#words button").all_inner_texts() == ["a", "red", "circle"]
    bars = page.locator("#heat-views .row-words")
    assert [bars.nth(r).locator("button").all_inner_texts() for r in range(3)] == [
        ["a", "red", "circle"], ["a", "blue", "circle"], ["a", "big", "blue", "circle"]]  # fmt: skip
    page.click("#words button[data-word='1']")  # "red" on the source: the swapped word on the edited image
    caps = page.locator("#heat-views figcaption").all_inner_texts()
    assert "word \u201cred\u201d" in caps[0] and "word \u201cblue\u201d" in caps[1], caps
    assert bars.nth(1).locator("button.active").inner_text() == "blue"
    before = pg.pixels("#heat-views canvas", 2)
    bars.nth(2).locator("button", has_text="blue").click()  # the third image's own "blue"
    caps = page.locator("#heat-views figcaption").all_inner_texts()
    assert "word \u201cblue\u201d" in caps[2] and "position" not in caps[2] and "word \u201cred\u201d" in caps[0]
    assert pg.pixels("#heat-views canvas", 2) != before
    pg.tab("steps")
    steps = page.locator("#steps-views .row-words")
    assert steps.nth(2).locator("button").all_inner_texts() == ["a", "big", "blue", "circle"]
    assert "word \u201cblue\u201d" in page.locator("#steps-views figcaption").nth(2).inner_text()
    pg.shot("edit-group")
    assert pg.errors == [], pg.errors
