"""`write_report(run_dir)`: one static, self-contained `index.html` explorer for every run under a folder.

The page embeds its data (see `explorer.py`), its script and its style: no server, no network, it
works from `file://` and can be mailed as one file. It shows, for the item picked (and a second one
side by side): heat maps per word over the image with an opacity control; with the `attnmaps`
observer, maps per step range, layer (block) and head; statistics as interactive plots (a line per
site or per block, hover labels, a legend of every line); token x token maps for text models;
`shapes` tables; items, warnings and files. Its size is bounded by `max_mb` (default 100 MB).
"""

from __future__ import annotations

import html
import json
from importlib import resources
from pathlib import Path

from ..core.errors import RunError
from ..core.messages import MANIFEST
from .explorer import build_payload

__all__ = ["find_runs", "write_report"]

_BODY = """
<header><h1>attntrace explorer: {title}</h1>
<label>run <select id="run"></select></label>
<label>item <select id="itemA"></select></label>
<label>compare with <select id="itemB"></select></label></header>
<nav class="tabs">
<button type="button" data-tab="heat">Heat maps</button>
<button type="button" data-tab="steps">Steps &amp; layers</button>
<button type="button" data-tab="stats">Statistics</button>
<button type="button" data-tab="tokens">Token &times; token</button>
<button type="button" data-tab="shapes">Shapes</button>
<button type="button" data-tab="items">Items &amp; files</button>
</nav>
<main><div id="warnings"></div>
<div class="controls" id="wordbar"><span>word</span><div class="words" id="words"></div>
<label>overlay opacity <input type="range" id="alpha" min="0" max="1" step="0.05" value="0.5">
<span id="alphaLabel">0.5</span></label><span id="cbar" title="low to high attention"></span></div>
<section class="tab" id="tab-heat"><div class="side" id="heat-views"></div></section>
<section class="tab" id="tab-steps"><div class="controls">
<label>from step <input type="range" id="stepFrom" min="0" value="0"></label>
<label>to step <input type="range" id="stepTo" min="0" value="0"></label> <span id="stepLabel"></span>
<label>layer <select id="group"></select></label><label>head <select id="head"></select></label></div>
<div class="side" id="steps-views"></div></section>
<section class="tab" id="tab-stats"><div class="controls">
<label>metric <select id="metric"></select></label>
<label>lines <select id="grouping"><option value="site">one per site</option>
<option value="block">one per block (mean of its sites)</option></select></label>
<label>head <select id="statHead"></select></label>
<span class="muted">hover for a line's name and value; click a legend entry to hide it</span></div>
<div id="stats-views"></div></section>
<section class="tab" id="tab-tokens"><div class="controls">
<label>layer <select id="tokGroup"></select></label><label>head <select id="tokHead"></select></label></div>
<div class="side" id="tokens-views"></div></section>
<section class="tab" id="tab-shapes"><div id="shapes-views"></div></section>
<section class="tab" id="tab-items"><div id="items-views"></div></section>
</main><div id="tooltip"></div>
"""


def find_runs(root: Path) -> list[Path]:
    """`root` itself if it holds a run's `manifest.json`, else every folder below it that does (sorted)."""
    from ..runs import is_run_manifest, read_json

    if (root / MANIFEST).is_file():
        return [root]
    found = []
    for man in sorted(root.rglob(MANIFEST)):
        if "items" in man.relative_to(root).parts[:-1]:
            continue  # a `save` observer's manifest inside an item, not a run
        if is_run_manifest(read_json(man)):
            found.append(man.parent)
    return found


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath("assets", name).read_text(encoding="utf-8")


def write_report(run_dir: str | Path, *, max_mb: float = 100.0) -> Path:
    """Write `index.html` into `run_dir` (a run or a folder of runs); return its path."""
    base = Path(run_dir)
    if not base.is_dir():
        raise RunError(f"no run directory at {base}")
    runs = find_runs(base)
    if not runs:
        raise RunError(f"{base} holds no run (no manifest.json); run `attntrace run EXP.yaml` first")
    for r in runs:
        try:
            json.loads((r / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RunError(f"cannot read {r / 'manifest.json'}: {exc}") from None
    payload, _ = build_payload(runs, base, max_mb=max_mb)
    # `</` must not appear inside a <script> element: JSON allows escaping the slash.
    data = json.dumps(payload, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    title = html.escape(base.resolve().name)
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>attntrace explorer: {title}</title><style>{_asset('explorer.css')}</style></head><body>"
        + _BODY.format(title=title)
        + f'<script type="application/json" id="attntrace-data">{data}</script>'
        + f"<script>{_asset('explorer.js')}</script></body></html>\n"
    )
    index = base / "index.html"
    tmp = index.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(index)
    return index
