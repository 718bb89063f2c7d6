"""attntrace: see and change what happens inside attention layers, without copying any layer's code.

```python
from attntrace import Tracer
tracer = Tracer({"rules": [{"use": "shapes", "match": "*attn2"}]})
with tracer.attach(unet):
    unet(latents, t, encoder_hidden_states=emb)
```
"""

from __future__ import annotations

from .call import AttentionCall
from .config import Rule, TraceConfig
from .errors import (
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
from .observer import Observer
from .registry import register as register_observer
from .runio import RunEntry, SavedRun, load_run
from .site import Site
from .tracer import Attachment, Tracer, find_sites

__version__ = "0.1.0"

__all__ = [
    "AttachError",
    "Attachment",
    "AttentionCall",
    "AttnTraceError",
    "ConfigError",
    "EditError",
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
