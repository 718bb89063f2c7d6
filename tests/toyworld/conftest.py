"""Shared fixtures of the toy-world tests: the shipped pipeline, its random-weight twin, and the
measurements several tests read (computed once per session)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models: one thread is as fast, and it never waits on a descheduled second thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def toy_pipe() -> Any:
    from attntrace.toyworld.model import load_pipeline

    return load_pipeline()


@pytest.fixture(scope="session")
def random_pipe() -> Any:
    from attntrace.toyworld.model import random_pipeline

    return random_pipeline(seed=0)


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    from attntrace.toyworld.semantics import heldout_prompts

    return heldout_prompts(24)


@pytest.fixture(scope="session")
def trained_loc(toy_pipe: Any, prompts: list[str]) -> Any:
    from attntrace.toyworld.semantics import measure_localisation

    torch.set_num_threads(1)
    return measure_localisation(toy_pipe, prompts)


@pytest.fixture(scope="session")
def random_loc(random_pipe: Any, prompts: list[str], trained_loc: Any) -> Any:
    from attntrace.toyworld.semantics import measure_localisation

    torch.set_num_threads(1)
    # The random twin draws no objects: its maps are scored against the trained model's objects.
    return measure_localisation(random_pipe, prompts, masks=trained_loc.masks)
