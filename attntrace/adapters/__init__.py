"""Framework adapters: how to find sites and install interception, one module per framework.

Adapters are tried in order (diffusers, transformers, hand-written transformers attention, plain
PyTorch, hand-written plain PyTorch attention); a module found by an earlier
adapter is not claimed by a later one. `register_adapter` adds a third-party adapter (a public,
stable extension point).
"""

from __future__ import annotations

import torch

from .base import Adapter, Undo

__all__ = ["Adapter", "Undo", "adapters_for", "register_adapter"]

_extra: list[Adapter] = []


def register_adapter(adapter: Adapter, *, first: bool = True) -> None:
    """Add an adapter; `first=True` lets it claim modules before the built-in ones."""
    if first:
        _extra.insert(0, adapter)
    else:
        _extra.append(adapter)


def _builtin() -> list[Adapter]:
    out: list[Adapter] = []
    from .diffusers import DiffusersAdapter

    out.append(DiffusersAdapter())
    try:
        from .transformers import TransformersAdapter
    except ImportError:
        pass
    else:
        out.append(TransformersAdapter())
        # Hand-written transformers attention (softmax inline); after the registry adapter, so a
        # composite model (SAM, BLIP-2...) gets both, each on its own modules.
        from .hf_manual import HFManualAdapter

        out.append(HFManualAdapter())
    try:
        from .torch import TorchAdapter
    except ImportError:
        pass
    else:
        out.append(TorchAdapter())
        # Hand-written softmax attention in plain PyTorch modules (not transformers models).
        from .torch_manual import ManualTorchAdapter

        out.append(ManualTorchAdapter())
    return out


def adapters_for(model: torch.nn.Module) -> list[Adapter]:
    """The adapters that apply to `model`, in claim order."""
    return [a for a in (*_extra, *_builtin()) if a.applies_to(model)]
