"""The core: what every other layer builds on, importing nothing of attntrace above it.

`call` (the `AttentionCall`), `kernel` (the attention math), `site` (a traceable module), `layout`
(token layout of a call), `selection` (globs, kinds, steps), `observer` (the `Observer` base),
`errors` (the one exception hierarchy) and `messages` (wording shared by several layers).
"""
