"""attntrace: see and change what happens inside attention layers, without copying any layer's code.

```python
from attntrace import Tracer
tracer = Tracer({"rules": [{"use": "shapes", "match": "*attn2"}]})
with tracer.attach(unet):
    unet(latents, t, encoder_hidden_states=emb)
```
"""

from __future__ import annotations

import sys as _sys

from .config import Rule, TraceConfig
from .core.call import AttentionCall
from .core.errors import (
    AttachError,
    AttnTraceError,
    ConfigError,
    EditError,
    OutputWriteError,
    PluginError,
    RunError,
    SelectionError,
    UnknownObserverError,
)
from .core.generation import Generation
from .core.observer import Observer
from .core.site import Site
from .registry import register as register_observer
from .runio import RunEntry, SavedRun
from .runs import load_run
from .tracer import Attachment, Tracer, find_sites

__version__ = "0.1.0"

# Module paths before the core/tracing split (issue 13) stay importable for code written against them;
# attntrace's own modules use the new paths (tests/test_architecture.py checks).
from .adapters.diffusers import proxy as _proxy
from .core import call as _call
from .core import errors as _errors
from .core import generation as _generation
from .core import kernel as _kernel
from .core import observer as _observer
from .core import selection as _selection
from .core import site as _site
from .core import words as _words
from .tracing import compiled as _compiled
from .tracing import intercept as _intercept

for _old, _module in {"call": _call, "errors": _errors, "kernel": _kernel, "observer": _observer,
                      "selection": _selection, "site": _site,
                      "generation": _generation, "words": _words, "compiled": _compiled, "intercept": _intercept,
                      "proxy": _proxy}.items():  # fmt: skip
    _sys.modules.setdefault(f"{__name__}.{_old}", _module)

__all__ = [
    "AttachError",
    "Attachment",
    "AttentionCall",
    "AttnTraceError",
    "ConfigError",
    "EditError",
    "Generation",
    "Observer",
    "OutputWriteError",
    "PluginError",
    "Rule",
    "RunEntry",
    "RunError",
    "SavedRun",
    "SelectionError",
    "Site",
    "TraceConfig",
    "Tracer",
    "UnknownObserverError",
    "__version__",
    "find_sites",
    "load_run",
    "register_observer",
]
