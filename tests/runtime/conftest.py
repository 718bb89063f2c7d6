"""Runtime-feature tests: one thread (the box is shared), and a record of outcomes for the docs table.

Each test carries `@pytest.mark.feature("<feature>", "<group>")`; its docstring says what it checks and
what it took. With `ATTNTRACE_RUNTIME_TABLE=<file.json>`, outcomes are written there for
`tests/gen_runtime_table.py`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_records: list[dict[str, Any]] = []


@pytest.fixture(autouse=True)
def _threads(one_thread: None) -> None:
    """Every test here runs with torch on one thread (`one_thread` of tests/conftest.py)."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("feature")
    if marker is None or not os.environ.get("ATTNTRACE_RUNTIME_TABLE"):
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        reason = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        elif report.failed:
            reason = str(getattr(report.longrepr, "reprcrash", None) and report.longrepr.reprcrash.message)[:300]
        doc = (getattr(item, "function", None).__doc__ or "").strip()  # type: ignore[union-attr]
        _records.append({"test": item.nodeid, "feature": marker.args[0], "group": marker.args[1],
                         "outcome": report.outcome, "reason": reason, "doc": " ".join(doc.split())})  # fmt: skip


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("ATTNTRACE_RUNTIME_TABLE")
    if path and _records:
        Path(path).write_text(json.dumps(_records, indent=1))
