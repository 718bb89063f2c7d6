"""Item and step progress of a run: tqdm bars when installed and enabled, otherwise one line per item."""

from __future__ import annotations

import sys
from typing import Any

from .plan import Item

__all__ = ["Progress"]


class Progress:
    """Item and step progress: tqdm bars when installed and enabled, otherwise one line per item."""

    def __init__(self, total: int, enabled: bool = True, prefix: str = "") -> None:
        self.enabled = enabled
        self.prefix = prefix
        self.total = total
        self.done = 0
        self._bar: Any = None
        self._steps: Any = None
        self._tqdm: Any = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self._tqdm = tqdm
                self._bar = tqdm(total=total, desc=f"{prefix}items", unit="item", file=sys.stderr, position=0)
            except ImportError:
                self._tqdm = None

    def item_start(self, item: Item, steps: int | None) -> None:
        if not self.enabled:
            return
        if self._tqdm is not None and steps:
            self._steps = self._tqdm(
                total=steps,
                desc=f"{self.prefix}{item.id}",
                unit="step",
                leave=False,
                file=sys.stderr,
                position=1,
            )
        elif self._tqdm is None:
            print(f"{self.prefix}[{self.done + 1}/{self.total}] {item.id}: {item.prompt!r}", file=sys.stderr)

    def step(self) -> None:
        if self._steps is not None:
            self._steps.update(1)

    def item_end(self) -> None:
        self.done += 1
        if self._steps is not None:
            self._steps.close()
            self._steps = None
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._steps is not None:
            self._steps.close()
        if self._bar is not None:
            self._bar.close()
