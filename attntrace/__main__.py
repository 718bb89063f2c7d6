"""`python -m attntrace ...` (also what `torchrun -m attntrace` and `accelerate launch -m attntrace` run)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
