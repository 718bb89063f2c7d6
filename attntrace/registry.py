"""Observer lookup by name: built-ins and the `attntrace.observers` entry-point group.

Nothing is imported until a name is used or the list is asked for. A plugin that fails to load is
reported when it is used (and as a warning line when listing); other plugins keep working. Two
plugins claiming one name is an error naming both; `dist:name` selects one.
"""

from __future__ import annotations

import contextlib
import importlib
import re
from dataclasses import dataclass
from importlib import metadata

from pydantic import BaseModel

from .core.errors import PluginError, UnknownObserverError
from .core.messages import unknown_needs
from .core.observer import NEEDS, Observer

__all__ = ["ENTRY_POINT_GROUP", "ObserverEntry", "available", "get", "register"]

ENTRY_POINT_GROUP = "attntrace.observers"

#: Built-in observers: name -> "module:Class" (imported on first use).
BUILTINS: dict[str, str] = {
    "shapes": "attntrace.observers.shapes:Shapes",
    "stats": "attntrace.observers.stats:Stats",
    "save": "attntrace.observers.save:Save",
    "heatmap": "attntrace.observers.heatmap:Heatmap",
    "attnmaps": "attntrace.observers.attnmaps:AttnMaps",
    "reweight": "attntrace.observers.reweight:Reweight",
    "replace": "attntrace.observers.replace:Replace",
    "local_blend": "attntrace.observers.local_blend:LocalBlend",
    "kv_inject": "attntrace.observers.kv_inject:KVInject",
    "masactrl": "attntrace.observers.masactrl:MasaCtrl",
    "ablate": "attntrace.observers.ablate:Ablate",
    "temperature": "attntrace.observers.temperature:Temperature",
    "token_map": "attntrace.observers.token_map:TokenMap",
}


@dataclass
class ObserverEntry:
    """One registered observer name and where it comes from."""

    name: str
    target: str
    dist: str  # "attntrace" for built-ins, the distribution name for plugins, "python" for register()
    cls: type[Observer] | None = None
    error: str | None = None

    def load(self) -> type[Observer]:
        """Import and check the class; raise `PluginError` naming dist, entry point and cause."""
        if self.cls is not None:
            return self.cls
        ep = f"entry point {self.name} = {self.target!r}"
        where = f"observer {self.name!r} ({ep} of distribution {self.dist!r})"
        module_name, sep, attr = self.target.partition(":")
        if not module_name.strip() or not sep or not attr.strip():
            self.error = f"entry point value {self.target!r} is not of the form 'module:Class'"
            raise PluginError(f"{where} is invalid: {self.error}")
        try:
            obj: object = importlib.import_module(module_name.strip())
            for part in attr.strip().split("."):
                obj = getattr(obj, part)
        except (Exception, SystemExit) as exc:  # a broken plugin must not take the host down
            self.error = f"{type(exc).__name__}: {exc}"
            raise PluginError(f"{where} failed to load: {self.error}") from exc
        if not (isinstance(obj, type) and issubclass(obj, Observer)):
            self.error = f"{self.target} is a {type(obj).__name__}, not an attntrace.Observer subclass"
            raise PluginError(f"{where} is invalid: {self.error}")
        needs = obj.needs
        bad = set(needs) - NEEDS if isinstance(needs, (set, frozenset, tuple, list)) else {needs}
        if bad:
            self.error = unknown_needs(obj.__name__, map(str, bad), NEEDS)
            raise PluginError(f"{where} is invalid: {self.error}")
        if not (isinstance(obj.Params, type) and issubclass(obj.Params, BaseModel)):
            self.error = f"{obj.__name__}.Params must be a pydantic BaseModel subclass"
            raise PluginError(f"{where} is invalid: {self.error}")
        if not obj.name:
            obj.name = self.name
        self.cls = obj
        return obj


_python: dict[str, ObserverEntry] = {}
_plugins: list[ObserverEntry] | None = None


def register(name: str, cls: type[Observer]) -> None:
    """Register an observer class under `name` from Python (no packaging needed)."""
    if not (isinstance(cls, type) and issubclass(cls, Observer)):
        raise PluginError(f"register({name!r}, ...) needs an Observer subclass, got {cls!r}")
    _python[name] = ObserverEntry(name, f"{cls.__module__}:{cls.__qualname__}", "python", cls=cls)
    if not cls.name:
        cls.name = name


def _plugin_entries() -> list[ObserverEntry]:
    global _plugins
    if _plugins is None:
        found = []
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else "unknown"
            found.append(ObserverEntry(ep.name, ep.value, dist))
        _plugins = found
    return _plugins


def refresh() -> None:
    """Forget cached entry points (after installing a plugin or changing `sys.path` in a running process)."""
    global _plugins
    _plugins = None
    for key in [k for k in _loaded if k[0] not in ("attntrace", "python")]:
        del _loaded[key]
    importlib.invalidate_caches()


def _norm(dist: str) -> str:
    """PEP 503 normalised distribution name: `My_Plugin` and `my-plugin` are the same distribution."""
    return re.sub(r"[-_.]+", "-", dist).lower()


def _candidates(name: str) -> list[ObserverEntry]:
    dist, sep, short = name.partition(":")
    if sep:  # "dist:name" picks one distribution's entry
        if dist == "attntrace" and short in BUILTINS:
            return [ObserverEntry(short, BUILTINS[short], "attntrace")]
        return [e for e in _plugin_entries() if e.name == short and _norm(e.dist) == _norm(dist)]
    if name in _python:
        return [_python[name]]
    out = [ObserverEntry(name, BUILTINS[name], "attntrace")] if name in BUILTINS else []
    return out + [e for e in _plugin_entries() if e.name == name]


_loaded: dict[tuple[str, str], ObserverEntry] = {}


def get(name: str) -> type[Observer]:
    """The observer class registered as `name` (or `dist:name`)."""
    cands = _candidates(name)
    if not cands:
        known = ", ".join(sorted({e.name for e in available()}))
        raise UnknownObserverError(f"unknown observer {name!r}; known observers: {known}")
    if len(cands) > 1:
        who = " and ".join(f"{e.dist} ({e.target})" for e in cands)
        raise PluginError(
            f"observer name {name!r} is claimed by {who}; write 'DIST:{name}' to pick one, "
            f"e.g. '{cands[-1].dist}:{name}'"
        )
    entry = _loaded.setdefault((cands[0].dist, cands[0].name), cands[0])
    return entry.load()


def available(load: bool = False) -> list[ObserverEntry]:
    """Every registered observer entry; with `load=True` each is imported (errors kept on the entry)."""
    entries = [_loaded.get(("attntrace", n), ObserverEntry(n, t, "attntrace")) for n, t in BUILTINS.items()]
    entries += list(_python.values())
    entries += [_loaded.get((e.dist, e.name), e) for e in _plugin_entries()]
    if load:
        for e in entries:
            with contextlib.suppress(PluginError):
                e.load()
            _loaded[(e.dist, e.name)] = e
    return entries
