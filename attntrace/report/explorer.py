"""The data of the explorer page: what `attntrace report` embeds for each run and item.

Everything the page shows is embedded in `index.html` (no server, no network, works from `file://`):

- images: each generated image, at most `IMAGE_SIDE` pixels a side, as a data URI;
- `heatmap` maps (one per batch row and word), quantised to 8 bits per map (min and max kept);
- `attnmaps` maps per (step, group, row, [head], word) or token x token, 8 bits with each map's max;
- `stats` as float32: per (metric, site, step) the mean over batch rows and heads, and per head where
  the table has heads and the budget allows;
- `shapes` rows, the manifest's items, warnings and each item's files (links, not loaded).

`max_mb` bounds the page: when the embedded data would exceed it, per-head maps go first, then every
other step of `attnmaps`, then their resolution halves; the page says what was left out.
"""

from __future__ import annotations

import base64
import csv
import functools
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["IMAGE_SIDE", "build_payload"]

IMAGE_SIDE = 512
MAX_TOKENS_SHOWN = 40  # tokens offered when a prompt's words are unknown


def _b64(arr: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode("ascii")


def _image_uri(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as img:
        rgb = img.convert("RGB")
    if max(rgb.size) > IMAGE_SIDE:
        rgb.thumbnail((IMAGE_SIDE, IMAGE_SIDE))
    buf = io.BytesIO()
    if rgb.size[0] * rgb.size[1] > 128 * 128:  # photos: JPEG is a fifth of PNG's size
        rgb.save(buf, format="JPEG", quality=90)
        mime = "jpeg"
    else:
        rgb.save(buf, format="PNG")
        mime = "png"
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_SPECIAL = {"<|startoftext|>", "<|endoftext|>", "[CLS]", "[SEP]", "[PAD]", "<s>", "</s>", "<pad>", "<unk>"}


def _words(tokens: list[str] | None, n_tokens: int) -> tuple[list[str], list[list[int]]]:
    """Word labels and their token positions; special tokens left out. Unknown tokens: positions."""
    if tokens:
        from ..observers.heatmap import words_from_token_strings

        pairs = [(w, idx) for w, idx in words_from_token_strings(tokens) if max(idx) < n_tokens]
        if pairs:
            return [w for w, _ in pairs], [idx for _, idx in pairs]
    n = min(n_tokens, MAX_TOKENS_SHOWN)
    return [f"token {i}" for i in range(n)], [[i] for i in range(n)]


def _token_labels(tokens: list[str] | None, n: int) -> list[str]:
    out = []
    for i in range(n):
        tok = tokens[i] if tokens and i < len(tokens) else f"#{i}"
        out.append(tok.removesuffix("</w>").removeprefix("##").lstrip("\u0120\u2581") or tok)
    return out


def _merge_words(maps: np.ndarray, groups: list[list[int]], axis: int) -> np.ndarray:
    """Sum token maps into word maps along `axis` (the token axis)."""
    return np.stack([np.take(maps, g, axis=axis).sum(axis=axis) for g in groups], axis=axis)


def _merge_row_words(
    maps: np.ndarray, row_tokens: list[list[str] | None], row_axis: int, token_axis: int
) -> tuple[np.ndarray, list[list[str]]]:
    """Merge each batch row's token maps into its own prompt's words (an edit group's images have different
    prompts); rows with fewer words are padded with empty maps. Returns (maps, words of each row)."""
    per_row = [_words(t, maps.shape[token_axis]) for t in row_tokens]
    width = max(len(w) for w, _ in per_row)
    out = []
    for r, (words, groups) in enumerate(per_row):
        merged = _merge_words(np.take(maps, [r], axis=row_axis), groups, axis=token_axis)
        pad = [(0, 0)] * merged.ndim
        pad[token_axis] = (0, width - len(words))
        out.append(np.pad(merged, pad))
    return np.concatenate(out, axis=row_axis), [w for w, _ in per_row]


def _row_tokens(tokens: list[str] | None, prompt_tokens: Any, rows: int) -> list[list[str] | None]:
    """The tokens of each batch row: an edit group's own prompt per image, else the item's prompt for all."""
    if isinstance(prompt_tokens, list) and len(prompt_tokens) == rows:
        return list(prompt_tokens)
    return [tokens] * rows



def _quantise(maps: np.ndarray, map_dims: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8-bit maps, each scaled to its own [min, max]: (uint8 maps, min per map, max per map)."""
    flat = maps.reshape(-1, int(np.prod(maps.shape[-map_dims:]))).astype(np.float32)
    lo = flat.min(axis=1)
    hi = flat.max(axis=1)
    span = np.where(hi > lo, hi - lo, 1.0)
    q = np.rint((flat - lo[:, None]) / span[:, None] * 255).clip(0, 255).astype(np.uint8)
    return q.reshape(maps.shape), lo.astype(np.float32), hi.astype(np.float32)


def _packed(maps: np.ndarray, map_dims: int) -> dict[str, Any]:
    q, lo, hi = _quantise(maps, map_dims)
    return {"shape": list(maps.shape), "data": _b64(q), "lo": _b64(lo), "hi": _b64(hi)}


def _heatmap(folder: Path, tokens: list[str] | None, prompt_tokens: Any = None) -> dict[str, Any] | None:
    from safetensors.numpy import load_file

    data = load_file(str(folder / "heatmap.safetensors"))
    maps = data.get("maps")
    if maps is None or maps.ndim != 4:
        return None
    rows = _row_tokens(tokens, prompt_tokens, maps.shape[0])
    merged, row_words = _merge_row_words(maps.astype(np.float32), rows, row_axis=0, token_axis=1)
    # `words`: the first image's (the word bar); `row_words`: each image's own (rows, words, R, R)
    return {"label": folder.name, "words": row_words[0], "row_words": row_words, **_packed(merged, 2)}


def _attnmaps(
    folder: Path, tokens: list[str] | None, keep_heads: bool, step_stride: int, shrink: int, prompt_tokens: Any = None
) -> Any:
    from safetensors import safe_open

    with safe_open(str(folder / "attnmaps.safetensors"), framework="numpy") as fh:
        meta = {k: json.loads(v) for k, v in (fh.metadata() or {}).items()}
        maps = fh.get_tensor("maps").astype(np.float32)
        present = fh.get_tensor("present")
    heads = bool(meta.get("heads"))
    if not heads:  # one head axis always: (steps, groups, rows, heads, tokens, ...)
        maps = maps[:, :, :, None]
    dropped = []
    if heads and not keep_heads:
        maps = maps.mean(axis=3, keepdims=True)
        heads = False
        dropped.append("per-head maps")
    steps = list(meta.get("steps", []))
    if step_stride > 1:
        maps, present, steps = maps[::step_stride], present[::step_stride], steps[::step_stride]
        dropped.append(f"all but every {step_stride}th step")
    out: dict[str, Any] = {"label": folder.name, "kind": meta.get("kind"), "steps": steps,
                           "groups": meta.get("groups", []), "heads": heads,
                           "present": present.astype(np.uint8).flatten().tolist(),
                           "truncated": bool(meta.get("truncated"))}  # fmt: skip
    if meta.get("kind") == "tokens":
        n = maps.shape[-1]
        out["labels"] = _token_labels(tokens, n)
        out.update(_packed(maps, 2))
    else:
        rows = _row_tokens(tokens, prompt_tokens, maps.shape[2])
        maps, row_words = _merge_row_words(maps, rows, row_axis=2, token_axis=4)
        if shrink > 1 and maps.shape[-1] // shrink >= 4:
            r = maps.shape[-1] // shrink
            maps = maps.reshape(*maps.shape[:-2], r, shrink, r, shrink).mean(axis=(-1, -3))
            dropped.append(f"resolution {r}x{r}")
        out["words"], out["row_words"] = row_words[0], row_words
        out.update(_packed(maps, 2))
    out["dropped"] = dropped
    return out


@functools.lru_cache(maxsize=64)
def _stats_rows(path: Path) -> list[dict[str, Any]] | None:
    """The rows of a stats table (read once per report even when the budget makes it rebuild the page)."""
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            return [dict(zip(header, r)) for r in reader] if header else []
    import pyarrow.parquet as pq

    return [{k: str(v) for k, v in r.items()} for r in pq.read_table(path).to_pylist()]


@functools.lru_cache(maxsize=64)
def _stats(folder: Path, keep_heads: bool) -> dict[str, Any] | None:
    from ..observers.attnmaps import site_group

    path = folder / "stats.csv"
    if not path.is_file():
        path = folder / "stats.parquet"
    if not path.is_file():
        return None
    rows = _stats_rows(path)
    if not rows:
        return None
    series = list(dict.fromkeys((r["site"], int(r["index"])) for r in rows))
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    steps = sorted({int(r["step"]) for r in rows})
    head_ids = sorted({int(r["head"]) for r in rows if r["head"].lstrip("-").isdigit()})
    s_ix = {s: i for i, s in enumerate(series)}
    m_ix = {m: i for i, m in enumerate(metrics)}
    t_ix = {t: i for i, t in enumerate(steps)}
    h_ix = {h: i for i, h in enumerate(head_ids)}
    shape = (len(metrics), len(series), len(steps))
    total, count = np.zeros(shape), np.zeros(shape)
    nh = len(head_ids)
    htot = np.zeros((*shape, nh)) if nh and keep_heads else None
    hcnt = np.zeros((*shape, nh)) if htot is not None else None
    head_of = {str(h): i for h, i in h_ix.items()}
    for r in rows:
        key = (m_ix[r["metric"]], s_ix[(r["site"], int(r["index"]))], t_ix[int(r["step"])])
        v = float(r["value"])
        total[key] += v
        count[key] += 1
        if htot is not None and hcnt is not None and r["head"] in head_of:
            hk = (*key, head_of[r["head"]])
            htot[hk] += v
            hcnt[hk] += 1
    mean = np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)
    labels = [s if i == 0 else f"{s}[{i}]" for s, i in series]
    out = {
        "label": folder.name,
        "metrics": metrics,
        "steps": steps,
        "series": labels,
        "blocks": [site_group(s) for s, _ in series],
        "kinds": [next((r["kind"] for r in rows if r["site"] == s), "") for s, _ in series],
        "values": _b64(mean),
        "heads": 0,
    }
    if htot is not None and hcnt is not None:
        hmean = np.where(hcnt > 0, htot / np.maximum(hcnt, 1), np.nan).astype(np.float32)
        out.update(heads=nh, head_values=_b64(hmean))
    return out


def _item(run: Path, iid: str, rec: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    item_dir = run / "items" / iid
    tokens = rec.get("tokens")
    out: dict[str, Any] = {
        "id": iid,
        "prompt": rec.get("prompt"),
        "prompts": rec.get("prompts"),  # one per image when an item holds several (edit groups)
        "negative_prompt": rec.get("negative_prompt"),
        "seed": rec.get("seed"),
        "status": rec.get("status"),
        "error": rec.get("error"),
        "seconds": rec.get("seconds"),
        "tokens": tokens,
        "images": [],
        "heatmaps": [],
        "attnmaps": [],
        "stats": [],
        "shapes": [],
        "files": [],
    }
    if not item_dir.is_dir():
        return out
    images = sorted(item_dir.glob("image*.png"), key=lambda p: (len(p.name), p.name))
    out["images"] = [_image_uri(p) for p in images]
    for folder in sorted(p for p in item_dir.iterdir() if p.is_dir()):
        if (folder / "heatmap.safetensors").is_file():
            hm = _heatmap(folder, tokens, rec.get("prompt_tokens"))
            if hm:
                out["heatmaps"].append(hm)
        if (folder / "attnmaps.safetensors").is_file():
            out["attnmaps"].append(_attnmaps(folder, tokens, opts["map_heads"], opts["step_stride"], opts["shrink"],
                                             rec.get("prompt_tokens")))  # fmt: skip
        st = _stats(folder, opts["stat_heads"])
        if st:
            out["stats"].append(st)
        if (folder / "shapes.json").is_file():
            rows = json.loads((folder / "shapes.json").read_text(encoding="utf-8"))
            out["shapes"].append({"label": folder.name, "rows": rows})
    for f in sorted(item_dir.rglob("*")):
        if f.is_file():
            out["files"].append({"path": f.relative_to(run).as_posix(), "bytes": f.stat().st_size})
    return out


def _run_payload(run: Path, base: Path, opts: dict[str, Any]) -> dict[str, Any]:
    manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
    items = manifest.get("items", {})
    rel = run.relative_to(base).as_posix()
    return {
        "name": manifest.get("name", run.name),
        "dir": "" if rel == "." else rel,
        "warnings": manifest.get("warnings", []),
        "config": manifest.get("config"),
        "versions": manifest.get("versions"),
        "items": [_item(run, iid, rec, opts) for iid, rec in items.items()],
    }


def build_payload(runs: list[Path], base: Path, max_mb: float = 100.0) -> tuple[dict[str, Any], int]:
    """The page's data for `runs` (folders under `base`) within `max_mb`; returns (payload, JSON bytes)."""
    attempts = [
        {"map_heads": True, "stat_heads": True, "step_stride": 1, "shrink": 1},
        {"map_heads": False, "stat_heads": True, "step_stride": 1, "shrink": 1},
        {"map_heads": False, "stat_heads": False, "step_stride": 1, "shrink": 1},
        {"map_heads": False, "stat_heads": False, "step_stride": 2, "shrink": 1},
        {"map_heads": False, "stat_heads": False, "step_stride": 2, "shrink": 2},
        {"map_heads": False, "stat_heads": False, "step_stride": 5, "shrink": 2},
        {"map_heads": False, "stat_heads": False, "step_stride": 10, "shrink": 4},
    ]
    payload: dict[str, Any] = {}
    size = 0
    _stats.cache_clear()
    _stats_rows.cache_clear()
    for n, opts in enumerate(attempts):
        payload = {"runs": [_run_payload(r, base, opts) for r in runs], "budget_mb": max_mb, "notes": []}
        size = len(json.dumps(payload, separators=(",", ":")))
        if size <= max_mb * 1e6:
            break
        if n == len(attempts) - 1:
            payload["notes"].append(f"the data ({size / 1e6:.0f} MB) is over the {max_mb:g} MB budget")
    _stats.cache_clear()
    _stats_rows.cache_clear()
    if not opts["stat_heads"]:
        payload["notes"].append("statistics per head were left out to stay within the page budget")
    if not opts["map_heads"]:
        payload["notes"].append("attention maps per head were left out (if kept) to stay within the page budget")
    return payload, size
