"""What a framework adapter does: find a model's sites, install interception at chosen sites, undo it."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..site import Site
    from ..tracer import Attachment, SiteBinding

__all__ = ["Adapter", "Undo", "forward_mentions", "forward_source"]

Undo = Callable[[], None]


_source_cache: dict[tuple[type, str], bool] = {}


def forward_mentions(cls: type, needle: str) -> bool:
    """Whether the source of `cls.forward` contains `needle` (cached per class and needle)."""
    key = (cls, needle)
    cached = _source_cache.get(key)
    if cached is None:
        try:
            source = inspect.getsource(cls.forward)  # type: ignore[attr-defined]
        except (OSError, TypeError):
            source = ""
        cached = _source_cache[key] = needle in source
    return cached



def source_or_empty(fn: object) -> str:
    """`inspect.getsource(fn)`, or "" where there is no source."""
    try:
        return inspect.getsource(fn)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return ""


_forward_sources: dict[tuple[Any, ...], str] = {}


def forward_source(
    cls: type, helper_module_ok: Callable[[str], bool], getsource: Callable[[object], str] = source_or_empty
) -> str:
    """`cls.forward`'s source plus that of the `self.method(...)` helpers it calls (one level) whose
    defining module passes `helper_module_ok`; cached per class and arguments."""
    key = (cls, helper_module_ok, getsource)
    cached = _forward_sources.get(key)
    if cached is not None:
        return cached
    src = getsource(cls.forward)  # type: ignore[attr-defined]
    parts = [src]
    for name in sorted(set(re.findall(r"self\.(\w+)\(", src))):
        fn = getattr(cls, name, None)
        if inspect.isfunction(fn) and helper_module_ok(getattr(fn, "__module__", "") or ""):
            parts.append(getsource(fn))
    out = _forward_sources[key] = "\n".join(parts)
    return out


class Adapter:
    """Base class of framework adapters (diffusers, transformers, plain PyTorch).

    `find_sites` lists every attention site the adapter can see; `install` puts interception at
    one matched site and returns its undo; `prepare` may install model-wide machinery once (a
    registry entry, a hook) before any site and returns its undo. Undos run in reverse order and
    must be safe to call twice.
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

    def prepare(self, model: torch.nn.Module, attachment: Attachment, bindings: list[SiteBinding]) -> Undo | None:
        """Model-wide installation before sites are installed (optional)."""
        return None

    def install(self, binding: SiteBinding) -> Undo:
        """Install interception at one site; return the function that undoes it."""
        raise NotImplementedError

    def check_restored(self, binding: SiteBinding) -> str | None:
        """After undo: a warning message if the site was changed by someone else while attached."""
        return None
