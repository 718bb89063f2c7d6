"""Static reports of run directories."""

from __future__ import annotations

from .html import write_report

__all__ = ["write_report"]
