"""The per-site proxy processor: a generated subclass of the wrapped processor's class.

A proxy shares the wrapped processor's instance `__dict__`, so every attribute read or write
(`set_attention_backend` writing `_attention_backend`, IP-Adapter's `scale`...) reaches the wrapped
object, an `nn.Module` processor keeps its parameters visible to `.to()` and `state_dict()` under the
same keys, and `isinstance(proxy, WrappedClass)` stays true. Its `__call__` mirrors the wrapped
`__call__`'s signature, because diffusers filters `cross_attention_kwargs` by that signature; a
class-level signature (not an instance attribute) keeps `torch.compile` free of graph breaks.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol

__all__ = ["AttentionProxy", "ProxyTarget", "make_proxy", "unwrap"]


class ProxyTarget(Protocol):
    """What a proxy forwards to: the wrapped processor and the site's handler."""

    original: Any

    def call_processor(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any: ...


class AttentionProxy:
    """Marker base of every generated proxy class (`isinstance(p, AttentionProxy)`)."""

    __slots__ = ()

    @property
    def wrapped_processor(self) -> Any:
        """The original processor object this proxy stands in for."""
        return self._attntrace.original  # type: ignore[attr-defined]


_classes: dict[type, type] = {}


def _proxy_class(cls: type) -> type:
    proxy_cls = _classes.get(cls)
    if proxy_cls is not None:
        return proxy_cls
    try:
        signature = inspect.signature(cls.__call__)
    except (TypeError, ValueError):
        signature = None

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        target: ProxyTarget = self._attntrace
        return target.call_processor(args, kwargs)

    if signature is not None:
        __call__.__signature__ = signature  # type: ignore[attr-defined]
    __call__.__doc__ = getattr(cls.__call__, "__doc__", None)
    namespace = {
        "__slots__": ("_attntrace",),
        "__call__": __call__,
        "__module__": __name__,
        "__qualname__": f"Traced{cls.__name__}",
        "__doc__": f"attntrace proxy around {cls.__module__}.{cls.__qualname__}",
    }
    proxy_cls = type(f"Traced{cls.__name__}", (AttentionProxy, cls), namespace)
    _classes[cls] = proxy_cls
    return proxy_cls


def make_proxy(processor: Any, target: ProxyTarget) -> Any:
    """A proxy standing in for `processor` at one site (one proxy per site, never per object)."""
    if not hasattr(processor, "__dict__"):
        raise TypeError(f"{type(processor).__name__} has no instance __dict__ to share")
    cls = _proxy_class(type(processor))
    proxy = cls.__new__(cls)
    # Share, don't copy: reads, writes and nn.Module parameters stay those of the wrapped object.
    object.__setattr__(proxy, "__dict__", processor.__dict__)
    object.__setattr__(proxy, "_attntrace", target)
    return proxy


def unwrap(processor: Any) -> Any:
    """The original processor behind a proxy (or the object itself)."""
    while isinstance(processor, AttentionProxy):
        processor = processor._attntrace.original  # type: ignore[attr-defined]
    return processor
