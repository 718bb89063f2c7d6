"""An independent reference of prompt-to-prompt's controllers, written from the paper's definitions and the
semantics of its reference notebook (attention-store style), for parity tests and the benchmark.

It installs its own diffusers attention processor on every attention module of a UNet: probabilities
come from the module's `get_attention_scores` (baddbmm, the classic path), the controller edits the
conditional half of the CFG batch in place, and the output is `bmm(probs, v)`. The sampling loop is
prompt-to-prompt's `text2image_ldm_stable`: one start latent for every prompt, CFG as [uncond, cond],
`controller.step_callback` on the latents after every scheduler step. Nothing here imports attntrace.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


# -- words and alignments (from the definitions) ---------------------------------------------------
def word_inds(text: str, word: int | str, tokenizer: Any) -> list[int]:
    """Token positions (BOS = 0) of a space-separated word, given by index or by exact text (all matches)."""
    words = text.split(" ")
    places = [i for i, w in enumerate(words) if w == word] if isinstance(word, str) else [word]
    pieces = [tokenizer.decode([t]).strip("#") for t in tokenizer.encode(text)][1:-1]
    out, length, ptr = [], 0, 0
    for i, piece in enumerate(pieces):
        length += len(piece)
        if ptr in places:
            out.append(i + 1)
        if length >= len(words[ptr]):
            ptr, length = ptr + 1, 0
    return out


def swap_matrix(x: str, y: str, tokenizer: Any, n: int = 77) -> torch.Tensor:
    """The word-swap alignment: M[source token, target token], fractions where the token count changed."""
    wx, wy = x.split(" "), y.split(" ")
    assert len(wx) == len(wy)
    changed = [i for i in range(len(wy)) if wx[i] != wy[i]]
    src = [word_inds(x, i, tokenizer) for i in changed]
    dst = [word_inds(y, i, tokenizer) for i in changed]
    m = np.zeros((n, n))
    i = j = c = 0
    while i < n and j < n:
        if c < len(src) and src[c][0] == i:
            if len(src[c]) == len(dst[c]):
                m[src[c], dst[c]] = 1
            else:
                for t in dst[c]:
                    m[src[c], t] = 1 / len(dst[c])
            i, j, c = i + len(src[c]), j + len(dst[c]), c + 1
        elif c < len(src):
            m[i, j] = 1
            i, j = i + 1, j + 1
        else:
            m[j, j] = 1
            i, j = i + 1, j + 1
    return torch.from_numpy(m).float()


def refine_maps(x: str, y: str, tokenizer: Any, n: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
    """Needleman-Wunsch (match 1, mismatch -1, gap 0) of the token ids: per target token, its source or -1."""
    a, b = tokenizer.encode(x), tokenizer.encode(y)
    score = np.zeros((len(a) + 1, len(b) + 1), dtype=np.int32)
    back = np.zeros_like(score)
    back[0, 1:], back[1:, 0], back[0, 0] = 1, 2, 4
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            cand = (score[i, j - 1], score[i - 1, j], score[i - 1, j - 1] + (1 if a[i - 1] == b[j - 1] else -1))
            score[i, j] = max(cand)
            back[i, j] = 1 if score[i, j] == cand[0] else 2 if score[i, j] == cand[1] else 3
    i, j, pairs = len(a), len(b), []
    while i > 0 or j > 0:
        if back[i, j] == 3:
            i, j = i - 1, j - 1
            pairs.append((j, i))
        elif back[i, j] == 1:
            j -= 1
            pairs.append((j, -1))
        elif back[i, j] == 2:
            i -= 1
        else:
            break
    base = torch.tensor(pairs[::-1], dtype=torch.int64)
    alphas = torch.ones(n)
    alphas[: len(base)] = base[:, 1].ne(-1).float()
    mapper = torch.zeros(n, dtype=torch.int64)
    mapper[: len(base)] = base[:, 1]
    mapper[len(base) :] = len(b) + torch.arange(n - len(b))
    return mapper, alphas


def time_alpha(prompts: list[str], steps: int, windows: Any, tokenizer: Any, n: int = 77) -> torch.Tensor:
    """(steps+1, edited, 1, 1, n): 1 where a token's cross map is edited at a step."""
    windows = dict(windows) if isinstance(windows, dict) else {"default_": windows}
    windows.setdefault("default_", (0.0, 1.0))
    alpha = torch.zeros(steps + 1, len(prompts) - 1, n)

    def put(bounds: Any, e: int, cols: Any) -> None:
        lo, hi = (0.0, bounds) if isinstance(bounds, float) else bounds
        s, t = int(lo * alpha.shape[0]), int(hi * alpha.shape[0])
        alpha[:s, e, cols], alpha[s:t, e, cols], alpha[t:, e, cols] = 0, 1, 0

    for e in range(len(prompts) - 1):
        put(windows["default_"], e, torch.arange(n))
    for word, bounds in windows.items():
        if word != "default_":
            for e in range(len(prompts) - 1):
                ind = word_inds(prompts[e + 1], word, tokenizer)
                if ind:
                    put(bounds, e, ind)
    return alpha.reshape(steps + 1, len(prompts) - 1, 1, 1, n)


def equalizer(text: str, words: list[str], values: list[float], tokenizer: Any, n: int = 77) -> torch.Tensor:
    eq = torch.ones(len(values), n)
    for w in words:
        eq[:, word_inds(text, w, tokenizer)] = torch.tensor(values, dtype=torch.float32)[:, None]
    return eq


# -- controllers -----------------------------------------------------------------------------------
class Blend:
    """LocalBlend: mask from the words' summed cross maps at `res`, applied to the latents."""

    def __init__(self, prompts: list[str], words: list[Any], tokenizer: Any, steps: int, res: int,
                 start: float = 0.2, th: tuple[float, float] = (0.3, 0.3),
                 subtract: list[Any] | None = None) -> None:  # fmt: skip
        def layer(ws: list[Any]) -> torch.Tensor:
            a = torch.zeros(len(prompts), 1, 1, 1, 1, 77)
            for i, (p, w) in enumerate(zip(prompts, ws)):
                for word in [w] if isinstance(w, str) else w:
                    a[i, :, :, :, :, word_inds(p, word, tokenizer)] = 1
            return a

        self.alpha = layer(words)
        self.sub = layer(subtract) if subtract is not None else None
        self.start, self.th, self.res, self.counter = int(start * steps), th, res, 0

    def mask(self, x: torch.Tensor, maps: torch.Tensor, alpha: torch.Tensor, pool: bool) -> torch.Tensor:
        m = (maps * alpha).sum(-1).mean(1)
        if pool:
            m = F.max_pool2d(m, (3, 3), (1, 1), padding=(1, 1))
        m = F.interpolate(m, size=x.shape[2:])
        m = m / m.max(2, keepdim=True)[0].max(3, keepdim=True)[0]
        m = m.gt(self.th[1 - int(pool)])
        return m[:1] + m

    def __call__(self, x: torch.Tensor, store: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        self.counter += 1
        if self.counter <= self.start:
            return x
        n = self.res * self.res
        chosen = [m for m in store["down_cross"] + store["up_cross"] if m.shape[1] == n]
        maps = torch.cat([m.reshape(self.alpha.shape[0], -1, 1, self.res, self.res, 77) for m in chosen], dim=1)
        mask = self.mask(x, maps, self.alpha, True)
        if self.sub is not None:
            mask = mask * ~self.mask(x, maps, self.sub, False)
        mask = mask.float()
        return x[:1] + mask * (x - x[:1])


class Controller:
    """Edits the conditional half's maps; stores them (post-edit) for LocalBlend; counts steps by layer calls."""

    def __init__(self, n_prompts: int, steps: int, cross: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
                 alpha: torch.Tensor | None, self_steps: Any, blend: Blend | None = None,
                 self_max: int = 256) -> None:  # fmt: skip
        self.n, self.cross, self.alpha, self.blend, self.self_max = n_prompts, cross, alpha, blend, self_max
        lo, hi = (0.0, self_steps) if isinstance(self_steps, float) else self_steps
        self.self_window = (int(steps * lo), int(steps * hi))
        self.step, self.layer, self.layers = 0, 0, 0
        self.store: dict[str, list[torch.Tensor]] = {}
        self.step_store: dict[str, list[torch.Tensor]] = {"down_cross": [], "mid_cross": [], "up_cross": []}

    def edit(self, attn: torch.Tensor, is_cross: bool, place: str) -> torch.Tensor:
        if is_cross and attn.shape[1] <= 32**2:
            self.step_store[f"{place}_cross"].append(attn)
        if self.cross is None:
            return attn
        if is_cross or self.self_window[0] <= self.step < self.self_window[1]:
            h = attn.shape[0] // self.n
            a = attn.reshape(self.n, h, *attn.shape[1:])
            base, rep = a[0], a[1:]
            if is_cross:
                w = self.alpha[self.step]
                a[1:] = self.cross(base, rep) * w + (1 - w) * rep
            elif rep.shape[2] <= self.self_max:
                a[1:] = base.unsqueeze(0).expand(rep.shape[0], *base.shape)
            attn = a.reshape(self.n * h, *a.shape[2:])
        return attn

    def __call__(self, attn: torch.Tensor, is_cross: bool, place: str) -> torch.Tensor:
        h = attn.shape[0]
        attn[h // 2 :] = self.edit(attn[h // 2 :], is_cross, place)
        self.layer += 1
        if self.layer == self.layers:
            self.layer = 0
            self.step += 1
            if not self.store:
                self.store = self.step_store
            else:
                for key in self.store:
                    for i in range(len(self.store[key])):
                        self.store[key][i] += self.step_store[key][i]
            self.step_store = {"down_cross": [], "mid_cross": [], "up_cross": []}
        return attn

    def step_callback(self, x: torch.Tensor) -> torch.Tensor:
        return self.blend(x, self.store) if self.blend is not None else x


def replace_fn(mapper: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda base, rep: torch.einsum("hpw,bwn->bhpn", base, mapper)


def refine_fn(mapper: torch.Tensor, alphas: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    a = alphas.reshape(alphas.shape[0], 1, 1, alphas.shape[1])
    return lambda base, rep: base[:, :, mapper].permute(2, 0, 1, 3) * a + rep * (1 - a)


def reweight_fn(eq: torch.Tensor, prev: Callable[..., torch.Tensor] | None = None) -> Callable[..., torch.Tensor]:
    def fn(base: torch.Tensor, rep: torch.Tensor) -> torch.Tensor:
        if prev is not None:
            base = prev(base, rep)
        return base[None, :, :, :] * eq[:, None, None, :]

    return fn


# -- registration and sampling ---------------------------------------------------------------------
class RefProcessor:
    """The classic attention path (diffusers' AttnProcessor math) with the controller on the probabilities."""

    def __init__(self, controller: Controller, place: str) -> None:
        self.controller, self.place = controller, place

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, temb: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:  # fmt: skip
        is_cross = encoder_hidden_states is not None
        b = hidden_states.shape[0]
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        ctx = encoder_hidden_states if is_cross else hidden_states
        key, value = attn.head_to_batch_dim(attn.to_k(ctx)), attn.head_to_batch_dim(attn.to_v(ctx))
        probs = attn.get_attention_scores(query, key, None)
        probs = self.controller(probs, is_cross, self.place)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        assert out.shape[0] == b
        return out / attn.rescale_output_factor


def register(unet: Any, controller: Controller) -> Callable[[], None]:
    """Install the reference processor on every attention module; returns the undo."""
    old = unet.attn_processors
    procs = {}
    for name in old:
        place = "down" if name.startswith("down") else "up" if name.startswith("up") else "mid"
        procs[name] = RefProcessor(controller, place)
    controller.layers = len(procs)
    unet.set_attn_processor(procs)
    return lambda: unet.set_attn_processor(old)


@torch.no_grad()
def sample(pipe: Any, prompts: list[str], controller: Controller, latent: torch.Tensor, steps: int,
           guidance: float = 7.5) -> torch.Tensor:  # fmt: skip
    """prompt-to-prompt's text2image_ldm_stable on the pipeline's parts; returns the final latents."""
    tok, enc = pipe.tokenizer, pipe.text_encoder
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    text = enc(ids.input_ids)[0]
    unc = tok([""] * len(prompts), padding="max_length", max_length=ids.input_ids.shape[-1], return_tensors="pt")
    context = torch.cat([enc(unc.input_ids)[0], text])
    latents = latent.expand(len(prompts), *latent.shape[1:])
    undo = register(pipe.unet, controller)
    try:
        pipe.scheduler.set_timesteps(steps)
        for t in pipe.scheduler.timesteps:
            pred = pipe.unet(torch.cat([latents] * 2), t, encoder_hidden_states=context)["sample"]
            uncond, cond = pred.chunk(2)
            pred = uncond + guidance * (cond - uncond)
            latents = pipe.scheduler.step(pred, t, latents)["prev_sample"]
            latents = controller.step_callback(latents)
    finally:
        undo()
    return latents
