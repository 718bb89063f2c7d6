"""diffusers: sites are modules holding a `processor`; a per-site proxy runs it under an interceptor.

- `adapter`: finding sites and their kinds, installing and undoing the proxy, linear attention;
- `dispatch`: the interceptor for processors (dispatcher backends, the classic path, joint token order);
- `proxy`: the generated proxy class standing in for a processor.
"""

from .adapter import DiffusersAdapter

__all__ = ["DiffusersAdapter"]
