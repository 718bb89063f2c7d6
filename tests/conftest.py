"""Fixtures shared by the test modules: the demo pipeline on disk, and torch on one thread."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def demo_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo StableDiffusionPipeline (shipped configs, random weights from seed 0), saved once per
    session in a temporary folder: never the user's cache, so no test depends on what another version left."""
    from attntrace.demo import build_demo_pipeline

    return build_demo_pipeline(tmp_path_factory.mktemp("demo") / "tiny-sd", seed=0)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread for a module, restored afterwards. Tiny models on a shared 2-core machine:
    a second thread only contends (a forward took 5 s with 2 threads under load, 0.2 s with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
