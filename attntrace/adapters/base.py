"""What a framework adapter does: find a model's sites, install interception at chosen sites, undo it."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core.site import Site
from ..tracing.binding import SiteBinding

__all__ = ["Adapter", "Undo"]

Undo = Callable[[], None]


class Adapter:
    """Base class of framework adapters (diffusers, transformers, plain PyTorch).

    `find_sites` lists every attention site the adapter can see; `install` puts interception at
    one matched site and returns its undo; `prepare` may install model-wide machinery once (a
    registry entry, a hook) before any site and returns its undo. Undos run in reverse order and
    must be safe to call twice. An adapter only finds, installs and undoes: each intercepted kernel
    call goes to `attntrace.tracing.run.run_call` with its tensors and token layout.
    """

    name: str = "base"

    def applies_to(self, model: torch.nn.Module) -> bool:
        """Whether this adapter understands `model` at all."""
        return True

    def find_sites(self, model: torch.nn.Module) -> list[Site]:
        """Every attention site of `model` this adapter can trace, in module order."""
        raise NotImplementedError

    def find_untraceable(self, model: torch.nn.Module) -> list[Site]:
        """Attention-looking modules this adapter cannot trace, each with a note saying why (optional).

        Asked only when no adapter found a traceable site; listed by `attntrace sites`, refused at attach.
        """
        return []

    def prepare(self, model: torch.nn.Module, bindings: list[SiteBinding]) -> Undo | None:
        """Model-wide installation before sites are installed (optional)."""
        return None

    def install(self, binding: SiteBinding) -> Undo:
        """Install interception at one site; return the function that undoes it."""
        raise NotImplementedError
