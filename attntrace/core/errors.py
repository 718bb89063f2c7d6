"""The one exception hierarchy of attntrace: everything it raises on purpose is an `AttnTraceError`."""

from __future__ import annotations

import errno
import re


class AttnTraceError(Exception):
    """Root of every error attntrace raises on purpose."""


class ConfigError(AttnTraceError):
    """A configuration value is invalid; the message names the field path and the fix."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class UnknownObserverError(ConfigError):
    """An observer name is not registered (built-in or plugin)."""


class SelectionError(AttnTraceError):
    """A site pattern matched nothing, or a rule cannot apply to the sites it matched."""


class AttachError(AttnTraceError):
    """Attaching a tracer failed (already attached, no attention sites, unsupported model)."""


class EditError(AttnTraceError):
    """An observer assigned a value of the wrong shape or type to an attention call."""


class PluginError(AttnTraceError):
    """A plugin observer could not be loaded or is not an `Observer`."""


class RunError(AttnTraceError):
    """An experiment run or a saved run directory is invalid or unreadable."""


class OutputWriteError(RunError):
    """Writing results failed (disk full, file too large, read-only or unwritable output); names the file."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(message)


# errno values that mean "the output cannot take more data": a run stops at the first one.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def write_failure(exc: BaseException) -> BaseException | None:
    """The write failure (disk full, file too large, read-only...) in `exc`'s chain, or None."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OutputWriteError):
            return e
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            return e
        # safetensors reports I/O errors as SafetensorError("... (os error 28)").
        m = re.search(r"os error (\d+)", str(e)) if type(e).__name__ == "SafetensorError" else None
        if m and int(m.group(1)) in _WRITE_ERRNOS:
            return e
        e = e.__cause__ or e.__context__
    return None


def describe_failure(exc: BaseException) -> str:
    """One line for a write failure: the OS message and file, or the error's text."""
    if isinstance(exc, OSError) and not isinstance(exc, OutputWriteError):
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    return " ".join(str(exc).split())
