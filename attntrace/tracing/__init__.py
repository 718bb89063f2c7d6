"""The tracing layer: the contract between the tracer and the adapters, and the one interception path.

- `binding`: `SiteBinding` (one traced site: its rules and the live session) and `Session` (what
  interception reads from an attachment) — typed, the only thing adapters get from the tracer;
- `run`: `run_call`, the one function taking an intercepted kernel call to a result;
- `intercept`: catching `F.scaled_dot_product_attention` inside a layer (a `TorchFunctionMode`);
- `compiled`: the same under `torch.compile` (one custom op);
- `handwritten`: following a hand-written `softmax(q·kᵀ) @ v` to its query/key, probs and consumer.

Imports only `attntrace.core` (and torch).
"""
