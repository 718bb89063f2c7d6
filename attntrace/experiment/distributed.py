"""Multi-process runs (`torchrun`/`accelerate launch`, env `RANK`/`WORLD_SIZE`): item *i* runs on rank
*i % world*; each rank writes `manifest.rank<k>.json`; rank 0 merges them into `manifest.json` after a
barrier (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import RunError
from ..core.messages import MANIFEST
from .plan import Item
from .rundir import new_manifest, read_manifest, write_json_atomic
from .spec import Experiment

__all__ = ["Dist", "merge_shards"]


@dataclass
class Dist:
    """Rank, world size and local rank from the launcher's environment (1 process: 0, 1, 0)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @classmethod
    def from_env(cls) -> Dist:
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise RunError("RANK/WORLD_SIZE/LOCAL_RANK must be integers") from None
        return cls(rank, max(world, 1), local)

    def init(self, use_cuda: bool) -> None:
        """Join the process group the launcher prepared (gloo on CPU, nccl on CUDA)."""
        if self.world <= 1:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if use_cuda and dist.is_nccl_available() else "gloo"
            dist.init_process_group(backend=backend, timeout=_dt.timedelta(hours=6))
            self.initialised_here = True

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()

    def close(self) -> None:
        if self.initialised_here:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def merge_shards(
    out: Path, exp: Experiment, items: list[Item], world: int, previous: dict[str, Any] | None
) -> dict[str, Any]:
    """Merge `manifest.rank<k>.json` files into `manifest.json` (rank 0, after the barrier)."""
    merged = new_manifest(exp, items, world)
    if previous is not None:
        merged["created"] = previous.get("created", merged["created"])
        for iid, rec in previous.get("items", {}).items():
            if iid in merged["items"]:
                merged["items"][iid] = rec
    timings: dict[str, Any] = {}
    last: dict[str, list[str]] = {"ran": [], "skipped": [], "failed": []}
    for k in range(world):
        shard = read_manifest(out / f"manifest.rank{k}.json")
        if shard is None:
            raise RunError(f"rank {k} wrote no shard manifest in {out}")
        timings.update(shard.get("timings", {}))
        for key in last:
            last[key] += list((shard.get("last_run") or {}).get(key, []))
        for it in items:
            if it.index % world == k:
                merged["items"][it.id] = shard["items"][it.id]
    merged["timings"] = timings
    merged["last_run"] = {"ranks": world, **last}
    write_json_atomic(out / MANIFEST, merged)
    return merged
