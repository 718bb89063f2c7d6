"""Following a transformers model that swaps its attention module while traced (BigBird's short-input switch).

BigBird and BigBird-Pegasus cannot run block-sparse attention on inputs of at most
`(5 + 2·num_random_blocks)·block_size` tokens (or with a cache): their `forward` then calls
`set_attention_type("original_full")`, and each attention parent (`BigBirdAttention`,
`BigBirdPegasusEncoderAttention`) builds a new full-attention module sharing the query/key/value
projections and assigns it to its `self` child; transformers keeps full attention for later calls.
The module the tracer patched never runs again, so without this the site would go quiet.

A traced site whose parent has `set_attention_type` and holds the site module gets that method shadowed
at instance level: after a swap, the interception leaves the module that left the model and is installed
on the new one, as a site of its own layout (full attention is dense: the hand-written softmax engine),
under the same rules and binding (its steps and activity stay one site's). A rule whose observer does not
accept the new site (its probability layout, or a tensor it cannot give) is not carried over: a warning
names it. The first swap of an attachment is announced once, naming the model, the sequence length and
the minimum for block-sparse attention. Detach removes both patches, from whichever module holds them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from ..core.selection import probs_layout_refusal
from ..core.site import Site
from ..tracing.binding import SiteBinding
from .base import Undo

__all__ = ["SwitchNotice", "follow_switch", "switching_parent"]


def switching_parent(model: torch.nn.Module, site: Site) -> tuple[torch.nn.Module, str] | None:
    """(parent, attribute) when the site module is a child its parent may replace via `set_attention_type`."""
    parent_name, _, attr = site.name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        return None
    if getattr(parent, attr, None) is not site.module:
        return None
    if not callable(getattr(type(parent), "set_attention_type", None)):
        return None
    return parent, attr


def _refusal(binding: SiteBinding, site: Site) -> str | None:
    """Why some rule of the binding cannot run at `site` (its probability layout or missing tensors), or None."""
    for e in binding.entries:
        obs = e.observer
        if (("probs" in obs.needs or obs.edits or obs.needs_layout)
                and probs_layout_refusal("", e.label, obs.probs_layouts, [site])):  # fmt: skip
            return (f"observer {e.label!r} reads {'/'.join(sorted(obs.probs_layouts))} probabilities, not "
                    f"{site.probs_layout} ones")  # fmt: skip
        lacking = sorted(set(obs.needs) & site.unavailable)
        if lacking:
            return f"observer {e.label!r} needs {lacking}, which {site.module_class} does not provide"
    return None


def _minimum(module: torch.nn.Module) -> str:
    cfg = getattr(module, "config", None)
    bs, r = getattr(cfg, "block_size", None), getattr(cfg, "num_random_blocks", None)
    if isinstance(bs, int) and isinstance(r, int):
        return f"more than (5 + 2·num_random_blocks)·block_size = {(5 + 2 * r) * bs} tokens"
    return "a longer input"


class SwitchNotice:
    """The warnings of one attachment: its first switch (with the sequence length of the call that caused it) and
    each reason a swapped-in module is not traced, once each."""

    def __init__(self) -> None:
        self.done = False
        self.told: set[str] = set()

    def refused(self, model: torch.nn.Module, site: Site, new: torch.nn.Module, value: Any, why: str) -> None:
        """Warn (once per reason) that a module swapped in is not traced."""
        if why not in self.told:
            self.told.add(why)
            warnings.warn(
                f"attntrace: {type(model).__name__} replaced site {site.name!r} (and any other it switched) by "
                f"{type(new).__name__} ({value!r}), which is not traced: {why}",
                RuntimeWarning,
                stacklevel=3,
            )

    def announce(self, model: torch.nn.Module, parent: torch.nn.Module, site: Site, new: torch.nn.Module,
                 value: Any) -> Callable[[], None]:  # fmt: skip
        """Warn at `new`'s first call (its input gives the sequence length); return what removes the hook."""
        if self.done:
            return lambda: None
        self.done = True

        def hook(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            handle.remove()
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            length = hidden.shape[1] if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 else "?"
            why = (f" (block-sparse attention needs {_minimum(parent)}; transformers keeps full attention for later "
                   "calls)") if value == "original_full" else ""  # fmt: skip
            warnings.warn(
                f"attntrace: {type(model).__name__} switched its attention to {value!r} at a sequence length of "
                f"{length}{why}; site {site.name!r} and the others it switched are traced as {type(new).__name__} "
                f"(probs layout {site.probs_layout!r})",
                RuntimeWarning,
                stacklevel=2,
            )

        handle = new.register_forward_pre_hook(hook, with_kwargs=True)
        return handle.remove


def follow_switch(binding: SiteBinding, install: Callable[[SiteBinding], Undo],
                  resite: Callable[[Site, torch.nn.Module], Site], notice: SwitchNotice) -> Undo:  # fmt: skip
    """Install `binding` and keep it installed on whatever module its parent swaps in (see module docstring)."""
    state: dict[str, Undo] = {"site": install(binding), "notice": lambda: None}
    model = binding.attachment.model
    found = switching_parent(model, binding.site)
    if found is None:
        return state["site"]
    parent, attr = found
    original = parent.set_attention_type

    def set_attention_type(value: Any, *args: Any, **kwargs: Any) -> Any:
        before = getattr(parent, attr)
        result = original(value, *args, **kwargs)
        new = getattr(parent, attr)
        if new is not before and isinstance(new, torch.nn.Module):
            state["site"]()  # the module that left the model is left unpatched
            state["site"] = lambda: None
            site = resite(binding.site, new)
            why = None if site.traceable else site.note
            why = why or _refusal(binding, site)
            if why:
                notice.refused(model, binding.site, new, value, why)
                return result
            binding.site = site
            state["site"] = install(binding)
            state["notice"]()
            state["notice"] = notice.announce(model, parent, site, new, value)
        return result

    parent.set_attention_type = set_attention_type  # an instance attribute shadows the class's method

    def undo() -> None:
        if vars(parent).get("set_attention_type") is set_attention_type:
            del parent.set_attention_type
        state["notice"]()
        state["site"]()

    return undo
