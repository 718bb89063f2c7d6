"""How big is the explorer of a 50-step SDXL-sized run, on disk and in the browser?

Builds a synthetic run directory with the shapes a real SDXL run writes (1024x1024 images, 70
cross-attention + 70 self-attention sites in 5 blocks, 10/20 heads, 77 text tokens, 50 steps, CFG
batch 2), through the observers' own writers (`stats`, `attnmaps`, `heatmap`'s file format,
`shapes`), then `write_report` and opens the page in headless Chromium, visiting every tab, and reads
the JS heap (CDP `Performance.getMetrics`).

    PYTHONPATH=. python benchmarks/bench_explorer_size.py [--items 2] [--heads]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

BLOCKS = {  # SDXL UNet: block -> (attentions, transformer blocks each, heads)
    "down_blocks.1": (2, 2, 10),
    "down_blocks.2": (2, 10, 20),
    "mid_block": (1, 10, 20),
    "up_blocks.0": (3, 10, 20),
    "up_blocks.1": (3, 2, 10),
}
STEPS, TOKENS, WORDS = 50, 77, 9


def sites() -> list[tuple[str, str, int]]:
    out = []
    for block, (atts, tbs, heads) in BLOCKS.items():
        for a in range(atts):
            for t in range(tbs):
                for attn, kind in (("attn1", "self"), ("attn2", "cross")):
                    out.append((f"{block}.attentions.{a}.transformer_blocks.{t}.{attn}", kind, heads))
    return out


def build(root: Path, items: int, heads: bool) -> Path:
    from safetensors.torch import save_file

    from attntrace.experiment.runner import write_json_atomic
    from attntrace.observers.attnmaps import AttnMaps
    from attntrace.observers.shapes import Shapes
    from attntrace.observers.stats import Stats

    run = root / "sdxl-50"
    tokens = ["<|startoftext|>", *[f"w{i}</w>" for i in range(WORDS)], "<|endoftext|>"]
    manifest = {"format": 1, "name": "sdxl-50", "config": {}, "items": {}}
    rng = np.random.default_rng(0)
    for i in range(items):
        iid = f"p{i:03d}-s0"
        d = run / "items" / iid
        d.mkdir(parents=True)
        # A smooth image (like a photo, unlike noise) at SDXL's size.
        small = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(small).resize((1024, 1024), Image.BICUBIC).save(d / "image.png")
        (d / "heatmap").mkdir()
        save_file({"maps": torch.rand(1, TOKENS, 64, 64), "count": torch.tensor(3500)},
                  str(d / "heatmap" / "heatmap.safetensors"), metadata={"levels": "1024,4096"})  # fmt: skip
        am = AttnMaps(heads=heads, resolution=32, max_mib=1e6)
        am.kind = "image"
        for s in range(STEPS):
            for block, (_, _, h) in BLOCKS.items():
                shape = (1, h, TOKENS, 32, 32) if heads else (1, TOKENS, 32, 32)
                am.sums[(s, block)] = [torch.rand(shape), 1]
        am.save(d / "attnmaps")
        st = Stats()
        for site, kind, h in sites():
            for s in range(STEPS):
                for metric in ("entropy", "max", "mean", "topk_mass"):
                    for b in (0, 1):
                        for hh in range(h):
                            st.rows.append((site, 0, s, float(999 - 20 * s), kind, b, hh, metric, float(rng.random())))
        st.save(d / "stats")
        sh = Shapes()
        for site, kind, h in sites():
            sh.rows[(site, 0, ())] = {"site": site, "kind": kind, "index": 0, "query": (2, h, 4096, 64),
                                      "key": (2, h, 77 if kind == "cross" else 4096, 64), "calls": STEPS}  # fmt: skip
        sh.save(d / "shapes")
        manifest["items"][iid] = {"index": i, "prompt": " ".join(t.removesuffix("</w>") for t in tokens[1:-1]),
                                  "seed": 0, "status": "done", "files": [], "tokens": tokens}  # fmt: skip
    write_json_atomic(run / "manifest.json", manifest)
    return run


def in_browser(index: Path) -> dict[str, float]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        page = b.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        cdp = page.context.new_cdp_session(page)
        cdp.send("Performance.enable")
        t0 = time.perf_counter()
        page.goto(index.as_uri())
        page.wait_for_selector("body[data-ready='1']", timeout=120000)
        load = time.perf_counter() - t0
        peak = 0.0
        for tab in ("heat", "steps", "stats", "shapes", "items"):
            page.click(f"nav.tabs button[data-tab={tab}]")
            page.wait_for_timeout(500)
            metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
            peak = max(peak, metrics["JSHeapUsedSize"])
        b.close()
    if errors:
        raise SystemExit(f"page errors: {errors}")
    return {"load_s": load, "js_heap_peak_mb": peak / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=1)
    ap.add_argument("--heads", action="store_true", help="attnmaps kept per head")
    ap.add_argument("--max-mb", type=float, default=100.0)
    args = ap.parse_args()
    from attntrace.report.html import write_report

    with tempfile.TemporaryDirectory() as tmp:
        run = build(Path(tmp), args.items, args.heads)
        on_disk = sum(f.stat().st_size for f in run.rglob("*") if f.is_file()) / 1e6
        t0 = time.perf_counter()
        index = write_report(run, max_mb=args.max_mb)
        build_s = time.perf_counter() - t0
        html_mb = index.stat().st_size / 1e6
        page = index.read_text()
        notes = json.loads(page.split('id="attntrace-data">', 1)[1].split("</script>", 1)[0])["notes"]
        res = in_browser(index)
    print(json.dumps({"items": args.items, "attnmaps_heads": args.heads, "run_on_disk_mb": round(on_disk, 1),
                      "report_build_s": round(build_s, 1), "html_mb": round(html_mb, 2),
                      "page_load_s": round(res["load_s"], 2), "js_heap_peak_mb": round(res["js_heap_peak_mb"], 1),
                      "thinned": notes}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
