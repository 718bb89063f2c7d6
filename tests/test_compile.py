"""torch.compile of a traced UNet: zero graph breaks with passive observers (Dynamo's own explanation)."""

from __future__ import annotations

import torch
import torch._dynamo as dynamo
from tiny import FAMILIES

from attntrace import AttentionCall, Observer, Tracer


class CountQ(Observer):
    needs = frozenset({"query"})

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def on_call(self, call: AttentionCall) -> None:
        self.n += 1


def test_traced_unet_compiles_without_graph_breaks() -> None:
    model, inputs = FAMILIES["sd15"]()

    def forward(**kw: object) -> torch.Tensor:
        return model(**kw, return_dict=False)[0]

    tracer = Tracer({"rules": [{"use": "shapes"}]})
    counter = tracer.add(CountQ())
    dynamo.reset()
    with tracer.attach(model), torch.no_grad():
        explanation = dynamo.explain(forward)(**inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert counter.n == len(tracer.sites(model))  # observers ran while Dynamo traced
    assert tracer.observers["shapes"].result()
