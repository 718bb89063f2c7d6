"""The one exception hierarchy of attntrace: everything it raises on purpose is an `AttnTraceError`."""

from __future__ import annotations


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
