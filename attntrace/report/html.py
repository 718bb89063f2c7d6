"""`write_report(run_dir)`: one static `index.html` showing every run under a folder.

For each run (a folder with `manifest.json`): a summary table of items (status, seed, seconds), each
item's images and every PNG its observers wrote (per-word heat-map grids, statistics plots), any
PNG at the run level, and the manifest itself. All paths are relative, so the folder can be moved,
zipped or served by any static server; nothing is fetched from the network.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..core.errors import RunError
from ..core.messages import MANIFEST

__all__ = ["find_runs", "write_report"]

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{font-size:1.25em;border-bottom:1px solid #ccc;margin-top:2em}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.2em .6em;text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;max-width:100%}
figure img{max-width:640px;max-height:640px;image-rendering:pixelated;border:1px solid #eee}
figcaption{font-size:.8em;color:#555;word-break:break-all}
.done{color:#070}.failed{color:#a00}.interrupted,.running,.pending{color:#a60}
pre{background:#f6f6f6;padding:.8em;overflow:auto;max-height:30em;font-size:.8em}
"""


# Marks the page once loaded with how many images decoded (used by the headless-browser test).
_CHECK_SCRIPT = (
    "<script>window.addEventListener('load',function(){var ok=0,bad=0;"
    "for(var i=0;i<document.images.length;i++){var m=document.images[i];"
    "if(m.complete&&m.naturalWidth>0){ok++}else{bad++}}"
    "document.body.setAttribute('data-images-ok',ok);document.body.setAttribute('data-images-broken',bad);});"
    "</script>"
)


def find_runs(root: Path) -> list[Path]:
    """`root` itself if it holds a `manifest.json`, else every folder below it that does (sorted)."""
    if (root / MANIFEST).is_file():
        return [root]
    return sorted(p.parent for p in root.rglob(MANIFEST))


def _src(path: Path, base: Path) -> str:
    return quote(path.relative_to(base).as_posix())


def _figure(path: Path, base: Path, caption: str | None = None) -> str:
    cap = html.escape(caption if caption is not None else path.relative_to(base).as_posix())
    return f'<figure><img src="{_src(path, base)}" alt="{cap}"><figcaption>{cap}</figcaption></figure>'


def _run_section(run: Path, base: Path) -> str:
    try:
        manifest: dict[str, Any] = json.loads((run / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read {run / 'manifest.json'}: {exc}") from None
    items: dict[str, Any] = manifest.get("items", {})
    name = html.escape(str(manifest.get("name", run.name)))
    out = [f'<h2 id="{quote(run.relative_to(base).as_posix() or "run")}">{name}</h2>']
    out.append(f"<p>folder <code>{html.escape(run.relative_to(base).as_posix() or '.')}</code></p>")
    rows = ["<tr><th>item</th><th>prompt / text</th><th>seed</th><th>status</th><th>seconds</th></tr>"]
    for iid, rec in items.items():
        status = html.escape(str(rec.get("status", "?")))
        err = f" — {html.escape(str(rec['error']))}" if rec.get("error") else ""
        eid, prompt = html.escape(iid), html.escape(str(rec.get("prompt", "")))
        rows.append(
            f"<tr><td><a href='#{eid}'>{eid}</a></td><td>{prompt}</td><td>{rec.get('seed', '')}</td>"
            f"<td class='{status}'>{status}{err}</td><td>{rec.get('seconds', '')}</td></tr>"
        )
    out.append("<table>" + "".join(rows) + "</table>")
    shown: set[Path] = set()
    for iid in items:
        item_dir = run / "items" / iid
        if not item_dir.is_dir():
            continue
        prompt = html.escape(str(items[iid].get("prompt", "")))
        out.append(f'<h3 id="{html.escape(iid)}">{html.escape(iid)}: {prompt}</h3>')
        pngs = sorted(item_dir.rglob("*.png"), key=lambda p: (p.parent != item_dir, p.as_posix()))
        groups: dict[str, list[Path]] = {}
        for p in pngs:
            rel = p.relative_to(item_dir)
            groups.setdefault(rel.parts[0] if len(rel.parts) > 1 else "", []).append(p)
        for label, files in groups.items():
            if label:
                out.append(f"<h4>{html.escape(label)}</h4>")
            out.append('<div class="grid">' + "".join(_figure(p, base) for p in files) + "</div>")
            shown.update(files)
    rest = [p for p in sorted(run.rglob("*.png")) if p not in shown]
    if rest:
        out.append(
            "<h3>other plots</h3><div class='grid'>" + "".join(_figure(p, base) for p in rest) + "</div>"
        )
    text = json.dumps(manifest, indent=1)
    out.append(f"<details><summary>manifest.json</summary><pre>{html.escape(text)}</pre></details>")
    return "\n".join(out)


def write_report(run_dir: str | Path) -> Path:
    """Write `index.html` into `run_dir` (a run or a folder of runs); return its path."""
    base = Path(run_dir)
    if not base.is_dir():
        raise RunError(f"no run directory at {base}")
    runs = find_runs(base)
    if not runs:
        raise RunError(f"{base} holds no run (no manifest.json); run `attntrace run EXP.yaml` first")
    sections = [_run_section(r, base) for r in runs]
    toc = ""
    for r in runs:
        rel = r.relative_to(base).as_posix()
        toc += f"<li><a href='#{quote(rel or 'run')}'>{html.escape(rel or r.name)}</a></li>"
    title = html.escape(base.resolve().name)
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>attntrace report: {title}</title><style>{_CSS}</style></head><body>"
        f"<h1>attntrace report: {title}</h1><ul>{toc}</ul>"
        + "\n".join(sections)
        + _CHECK_SCRIPT
        + "</body></html>\n"
    )
    index = base / "index.html"
    tmp = index.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(index)
    return index
