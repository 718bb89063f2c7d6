"""One wording for messages stated in several places: bounded reprs, unknown parameters, empty globs.

Kept in core so that the config model, the `Observer` base and the tracer give the same one-line
message for the same mistake, and none of them imports the others for it.
"""

from __future__ import annotations

import reprlib
from collections.abc import Iterable
from typing import Any

__all__ = ["EMPTY_GLOB", "MANIFEST", "short_repr", "unknown_needs", "unknown_parameter"]

#: The file name of every manifest attntrace writes (run directories and `save` folders).
MANIFEST = "manifest.json"

#: The message for an empty site glob (config rules and `Tracer.add`).
EMPTY_GLOB = "empty glob; use '*' for every site or a pattern like '*attn2'"

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxtuple, _repr.maxdict, _repr.maxset = 2, 4, 4, 4, 4
_repr.maxstring, _repr.maxother, _repr.maxlong = 40, 40, 40


def short_repr(value: Any, limit: int = 60) -> str:
    """A one-line repr of at most `limit` characters that never walks a whole (possibly alias-bomb) value."""
    shown = " ".join(_repr.repr(value).split())
    return shown[: limit - 3] + "..." if len(shown) > limit else shown


def unknown_parameter(observer: str, allowed: Iterable[str]) -> str:
    """The message for a parameter an observer's `Params` does not declare."""
    names = ", ".join(allowed) or "none"
    return f"unknown parameter for observer {observer!r} (allowed: {names})"


def unknown_needs(owner: str, unknown: Iterable[str], allowed: Iterable[str]) -> str:
    """The message for `needs` items outside the known set."""
    return f"{owner}.needs has unknown items {sorted(unknown)}; use {sorted(allowed)}"
