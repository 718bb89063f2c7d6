"""Context parallelism (`ContextParallelConfig`, `enable_parallelism`).

diffusers 0.42.1 cannot run it on a CPU-only machine: `ModelMixin._resolve_parallel_config` picks the device
as `torch.device(torch._C._get_accelerator().type, rank % torch.accelerator.device_count())`, and the device
count is 0 without an accelerator (ZeroDivisionError), before any mesh or gloo group is used; the device mesh
it would build is of the accelerator's type too. So here: that reason is checked, and attntrace's refusal is
checked on a model carrying a context-parallel config. The torchrun run (2 GPUs) is ready in `cp_worker.py`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from attntrace import AttachError, Tracer
from tests import tiny

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.feature("context parallelism", "parallelism")
def test_diffusers_cannot_run_context_parallel_on_cpu(one_rank_group: None) -> None:
    """The reason it is not run here: `enable_parallelism` divides by `torch.accelerator.device_count()` (0)."""
    from diffusers import ContextParallelConfig

    if torch.accelerator.device_count() > 0:
        pytest.skip("an accelerator is present: the torchrun test runs instead")
    model, _ = tiny.flux()
    with pytest.raises(ZeroDivisionError):
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))


@pytest.mark.feature("context parallelism", "parallelism")
def test_context_parallel_model_is_refused_by_name() -> None:
    """A model whose `_parallel_config` carries a `ContextParallelConfig` (what `enable_parallelism` records) is
    refused at attach with a one-line reason; nothing is installed."""
    from diffusers import ContextParallelConfig
    from diffusers.models._modeling_parallel import ParallelConfig

    model, inputs = tiny.flux()
    ref = tiny.run(model, inputs)
    processors = dict(model.attn_processors)
    model._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2))
    tracer = Tracer({"rules": [{"use": "shapes"}]})
    with pytest.raises(AttachError, match=r"context parallelism.*ring_degree=2"):
        tracer.attach(model)
    assert tracer.attachment is None
    assert all(model.attn_processors[k] is p for k, p in processors.items())
    model._parallel_config = None
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert torch.equal(tiny.run(model, inputs), ref)


@pytest.mark.feature("context parallelism", "parallelism")
@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_torchrun_two_ranks(mode: str) -> None:
    """`torchrun --nproc_per_node=2 tests/runtime/cp_worker.py <mode>` on two GPUs (NCCL): untraced parallel run,
    attach refused by name, model untouched and its output unchanged."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs: diffusers 0.42.1 builds context parallelism on an accelerator only "
                    "(rank % torch.accelerator.device_count() in ModelMixin._resolve_parallel_config)")  # fmt: skip
    torchrun = shutil.which("torchrun")
    assert torchrun is not None
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([torchrun, "--nproc_per_node=2", "tests/runtime/cp_worker.py", mode], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"CP {mode}: refused by name" in done.stdout
