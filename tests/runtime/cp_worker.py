"""One rank of the context-parallel check (run by tests/runtime/test_context_parallel.py under torchrun).

Each rank builds the same tiny Flux transformer, enables context parallelism (Ulysses or ring degree 2 from
argv), runs it untraced, then checks that attaching a tracer is refused by name and leaves the model as it was
(same processors, same output).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def main(mode: str) -> None:
    from diffusers import ContextParallelConfig

    from attntrace import AttachError, Tracer
    from tests import tiny

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    if torch.cuda.is_available():
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    model, inputs = tiny.flux()
    model.to(device)
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    if mode == "ring":
        model.set_attention_backend("_native_cudnn" if torch.cuda.is_available() else "native")
    config = ContextParallelConfig(ring_degree=2) if mode == "ring" else ContextParallelConfig(ulysses_degree=2)
    model.enable_parallelism(config=config)
    ref = tiny.run(model, inputs)
    processors = dict(model.attn_processors)
    try:
        tracer = Tracer({"rules": [{"use": "shapes"}]})
        tracer.attach(model)
    except AttachError as exc:
        assert "context parallelism" in str(exc), exc
    else:
        raise AssertionError("attaching to a context-parallel model was not refused")
    assert all(model.attn_processors[k] is p for k, p in processors.items())
    assert torch.equal(tiny.run(model, inputs), ref)
    if rank == 0:
        print(f"CP {mode}: refused by name, model untouched")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
