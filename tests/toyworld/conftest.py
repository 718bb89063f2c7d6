"""Shared fixtures of the toy-world tests: the shipped pipeline, its random-weight twin, and the
measurements several tests read (computed once per session)."""

from __future__ import annotations

from typing import Any

import pytest
import torch


@pytest.fixture(autouse=True)
def _threads(one_thread: None) -> None:
    """Every test here runs with torch on one thread (`one_thread` of tests/conftest.py)."""


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


@pytest.fixture(scope="session")
def joint_pipe() -> Any:
    from attntrace.toyworld.model import load_joint_pipeline

    return load_joint_pipeline()


@pytest.fixture(scope="session")
def random_joint_pipe() -> Any:
    from attntrace.toyworld.model import random_joint_pipeline

    return random_joint_pipeline(seed=0)


@pytest.fixture(scope="session")
def joint_loc(joint_pipe: Any, prompts: list[str]) -> Any:
    from attntrace.toyworld.semantics import measure_localisation

    torch.set_num_threads(1)
    return measure_localisation(joint_pipe, prompts)


@pytest.fixture(scope="session")
def random_joint_loc(random_joint_pipe: Any, prompts: list[str], joint_loc: Any) -> Any:
    from attntrace.toyworld.semantics import measure_localisation

    torch.set_num_threads(1)
    return measure_localisation(random_joint_pipe, prompts, masks=joint_loc.masks)
