"""`stats`: attention statistics per site, step and head, computed in query chunks under a memory budget.

Metrics (each averaged over the query rows of one batch item and head):

- `entropy`: Shannon entropy (nats) of each query row's distribution over keys.
- `max`: the largest probability of each query row.
- `mean`: the mean probability (1/Lk for unmasked rows; lower where rows are fully masked).
- `topk_mass`: the summed mass of each row's `topk` largest probabilities.
- `token_mass`: the mass on the key tokens `tokens` (indices into the text tokens). Computed only where
  the call knows its text tokens: cross-attention (all query rows) and joint attention (the image query
  rows, keys offset into the text part). Sites without text tokens get no `token_mass` rows.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..core.call import AttentionCall
from ..core.errors import ConfigError
from ..core.observer import Observer, batch_rows

__all__ = ["Stats", "StatsParams"]

Metric = Literal["entropy", "max", "mean", "topk_mass", "token_mass"]
DEFAULT_METRICS: list[str] = ["entropy", "max", "mean", "topk_mass"]
COLUMNS = ["site", "index", "step", "timestep", "kind", "batch", "head", "metric", "value"]


class StatsParams(BaseModel):
    """Parameters of `stats`."""

    model_config = ConfigDict(extra="forbid")

    metrics: list[Metric] = Field(default_factory=lambda: list(DEFAULT_METRICS), description="metrics to compute")
    topk: int = Field(default=5, ge=1, description="k of topk_mass")
    tokens: list[int] = Field(default_factory=list, description="text key token indices for token_mass")
    reduce_heads: bool = Field(default=False, description="report the mean over heads (head='mean')")
    reduce_batch: bool = Field(default=False, description="report the mean over batch items (batch='mean')")
    cond_half: bool = Field(default=False, description="keep only the conditional (second) half of a CFG batch")
    max_chunk_mib: float = Field(default=256.0, gt=0, description="peak extra memory budget per chunk, MiB")
    format: Literal["csv", "parquet"] = Field(default="csv", description="table file format")

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("choose at least one metric")
        return list(dict.fromkeys(v))

    @field_validator("tokens")
    @classmethod
    def _tokens(cls, v: list[int]) -> list[int]:
        if any(t < 0 for t in v):
            raise ValueError("token indices must be >= 0")
        return sorted(set(v))

    @model_validator(mode="after")
    def _token_mass_needs_tokens(self) -> StatsParams:
        if "token_mass" in self.metrics and not self.tokens:
            raise ValueError("metric token_mass needs tokens: the text token indices to measure, e.g. [1, 2]")
        return self

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v == "parquet" and importlib.util.find_spec("pyarrow") is None:
            raise ValueError("format 'parquet' needs pyarrow (pip install pyarrow), or use format: csv")
        return v


class Stats(Observer):
    """Entropy, max, mean, top-k mass and token mass per site, step and head (or their means).

    Memory: keeps one row per (site, call index, step, batch item or 'mean', head or 'mean', metric) and
    no attention maps, so it grows linearly with steps x sites x heads x metrics (a few dozen bytes per
    row). While a call is processed, the extra memory is about `max_chunk_mib` (one probability chunk and
    one temporary of the same size), however large the attention map.
    """

    name = "stats"
    needs = frozenset({"probs"})
    # Block-sparse probs are token x token (zero outside the attended blocks). Banded, block-local and sampling-
    # point (deformable) probs: every metric but `mean` is per row and layout-free; `mean` is then over the row's
    # columns (band, neighbourhood or sampling points) and `token_mass` is skipped (no text key axis).
    probs_layouts = frozenset({"dense", "banded", "block_sparse", "block_local", "sampling_point", "additive"})
    Params = StatsParams

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.rows: list[tuple[Any, ...]] = []

    # -- computation ---------------------------------------------------------------------------
    def on_call(self, call: AttentionCall) -> None:
        p = self.params
        metrics = list(p.metrics)
        keep = batch_rows(call, p.cond_half)

        token_keys = token_rows = None
        if "token_mass" in metrics:
            if call.text_tokens is None:
                metrics.remove("token_mass")
            else:
                text = call.text_tokens
                n_text = text.stop - text.start
                bad = [t for t in p.tokens if t >= n_text]
                if bad:
                    raise ConfigError(
                        f"token index {bad[0]} is out of range at site {call.site!r}, which has {n_text} text tokens",
                        field="tokens",
                    )
                token_keys = torch.tensor([text.start + t for t in p.tokens], device=call.query.device)
                # Joint attention: the text's own queries are not image positions; use the image rows.
                token_rows = call.image_tokens if call.kind == "joint" else None
        if not metrics:
            return

        sums: dict[str, torch.Tensor] = {}
        q_len = call.shape[2]
        n_token_rows = 0
        budget = int(p.max_chunk_mib * 2**20)
        for rows, chunk in call.iter_probs(budget, batch=keep):
            n_token_rows += self._reduce_chunk(sums, metrics, rows, chunk, token_keys, token_rows)
            # Drop this chunk before the generator computes the next one: otherwise the old chunk,
            # the new scores and the new probabilities coexist (1.5x the budget).
            del chunk

        for metric in metrics:
            if metric not in sums:
                continue
            denom = n_token_rows if metric == "token_mass" else q_len
            values = sums[metric] / max(denom, 1)  # (B', H) float64
            self._emit(call, metric, values, keep.start)

    def _reduce_chunk(
        self,
        sums: dict[str, torch.Tensor],
        metrics: list[str],
        rows: slice,
        c: torch.Tensor,
        token_keys: torch.Tensor | None,
        token_rows: slice | None,
    ) -> int:
        """Add one query chunk's per-row statistics to `sums`; return the rows counted for token_mass."""
        self._accumulate(sums, "max", metrics, lambda: c.amax(dim=-1))
        self._accumulate(sums, "mean", metrics, lambda: c.mean(dim=-1))
        if "topk_mass" in metrics:
            k = min(self.params.topk, c.shape[-1])
            self._accumulate(sums, "topk_mass", metrics, lambda: c.topk(k, dim=-1).values.sum(-1))
        if "entropy" in metrics:
            # One temporary of the chunk's size: p·log(p), with 0·log 0 = 0.
            plogp = c.clamp_min(1e-30).log_().mul_(c)
            self._accumulate(sums, "entropy", metrics, lambda: -plogp.sum(dim=-1))
            del plogp
        if token_keys is None:
            return 0
        sub = c
        if token_rows is not None:
            lo, hi = max(rows.start, token_rows.start), min(rows.stop, token_rows.stop)
            if lo >= hi:
                return 0
            sub = c[..., lo - rows.start : hi - rows.start, :]
        self._accumulate(sums, "token_mass", metrics, lambda: sub.index_select(-1, token_keys).sum(-1))
        return int(sub.shape[-2])

    @staticmethod
    def _accumulate(sums: dict[str, torch.Tensor], metric: str, metrics: list[str], fn: Any) -> None:
        if metric not in metrics:
            return
        part = fn().double().sum(dim=-1)  # sum over this chunk's query rows -> (B', H)
        sums[metric] = part if metric not in sums else sums[metric] + part

    def _emit(self, call: AttentionCall, metric: str, values: torch.Tensor, batch_offset: int) -> None:
        p = self.params
        if p.reduce_heads:
            values = values.mean(dim=1, keepdim=True)
        if p.reduce_batch:
            values = values.mean(dim=0, keepdim=True)
        vals = values.cpu().tolist()
        timestep = call.timestep
        for bi, row in enumerate(vals):
            b: int | str = "mean" if p.reduce_batch else batch_offset + bi
            for hi, v in enumerate(row):
                h: int | str = "mean" if p.reduce_heads else hi
                self.rows.append((call.site, call.index, call.step, timestep, call.kind, b, h, metric, float(v)))

    # -- results -------------------------------------------------------------------------------
    def result(self) -> StatsTable:
        """The tidy table: one dict per (site, index, step, batch, head, metric); shows a plot in notebooks."""
        return StatsTable(dict(zip(COLUMNS, r)) for r in self.rows)

    def to_frame(self) -> Any:
        """The table as a pandas DataFrame (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            raise ConfigError("Stats.to_frame() needs pandas (pip install pandas); result() gives dicts") from None
        return pd.DataFrame(self.result(), columns=COLUMNS)

    def save(self, directory: Path) -> list[Path]:
        """Write `stats.csv` (or `stats.parquet`) and the plot `stats.png` under `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        rows = self.result()
        if self.params.format == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table_path = directory / "stats.parquet"
            # batch/head mix ints and 'mean': store them as strings for one column type.
            cols = {c: [r[c] for r in rows] for c in COLUMNS}
            cols["batch"] = [str(x) for x in cols["batch"]]
            cols["head"] = [str(x) for x in cols["head"]]
            pq.write_table(pa.table(cols), table_path)
        else:
            import csv

            table_path = directory / "stats.csv"
            with table_path.open("w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(COLUMNS)
                for r in self.rows:
                    writer.writerow(["" if x is None else x for x in r])
        plot_path = directory / "stats.png"
        self._plot(plot_path)
        return [table_path, plot_path]

    def _plot(self, path: Path) -> None:
        plot_rows(self.rows, self.params.metrics).savefig(path, dpi=100)

    def _repr_png_(self) -> bytes:
        """The statistics plot, for notebooks."""
        return self.result()._repr_png_()

    def _repr_html_(self) -> str:
        """A summary and the plot, for notebooks."""
        return self.result()._repr_html_()

    def close(self) -> None:
        self.rows.clear()


class StatsTable(list):  # type: ignore[type-arg]
    """`Stats.result()`: a list of row dicts that also displays itself in notebooks (table summary + plot)."""

    def _tuples(self) -> list[tuple[Any, ...]]:
        return [tuple(r[c] for c in COLUMNS) for r in self]

    def plot(self) -> Any:
        """A matplotlib Figure: one panel per metric, a line per site (per block past 12 sites)."""
        metrics = list(dict.fromkeys(r["metric"] for r in self))
        return plot_rows(self._tuples(), metrics)

    def _repr_png_(self) -> bytes:
        import io

        buf = io.BytesIO()
        self.plot().savefig(buf, format="png", dpi=80)
        return buf.getvalue()

    def _repr_html_(self) -> str:
        import base64
        import html

        sites = len({(r["site"], r["index"]) for r in self})
        steps = sorted({r["step"] for r in self})
        metrics = ", ".join(dict.fromkeys(r["metric"] for r in self)) or "none"
        span = f"{steps[0]}..{steps[-1]}" if steps else "none"
        head = html.escape(f"stats: {len(self)} rows, {sites} site(s), steps {span}, metrics: {metrics}")
        if not self:
            return f"<p>{head}</p>"
        png = base64.b64encode(self._repr_png_()).decode("ascii")
        return f"<div><p>{head}</p><img src='data:image/png;base64,{png}' alt='attention statistics'></div>"


def plot_rows(rows: list[tuple[Any, ...]], wanted: list[str]) -> Any:
    """The statistics figure of `rows` (tuples in `COLUMNS` order) for the metrics in `wanted`."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .attnmaps import site_group

    # Mean over batch items and heads: one line per (site, index), one panel per metric; past 12
    # sites, one line per block (the mean of its sites), so that every line keeps a legend entry.
    n_sites = len({(r[0], r[1]) for r in rows})
    by_block = n_sites > 12
    agg: dict[str, dict[str, dict[int, list[float]]]] = {}
    for site, index, step, _t, _k, _b, _h, metric, value in rows:
        label = site if index == 0 else f"{site}[{index}]"
        if by_block:
            label = site_group(site)
        agg.setdefault(metric, {}).setdefault(label, {}).setdefault(step, []).append(value)
    metrics = [m for m in wanted if m in agg] or ["(no data)"]
    steps_seen = {r[2] for r in rows}
    fig = Figure(figsize=(9, 2.8 * len(metrics)), layout="constrained")
    FigureCanvasAgg(fig)  # Agg explicitly: no display, and no change to the user's pyplot backend
    axes = fig.subplots(len(metrics), 1, squeeze=False)[:, 0]
    for ax, metric in zip(axes, metrics):
        lines = agg.get(metric, {})
        if not lines:
            ax.text(0.5, 0.5, "no attention calls recorded", ha="center", va="center", transform=ax.transAxes)
        cmap = matplotlib.colormaps["viridis"]
        for i, (label, by_step) in enumerate(lines.items()):
            steps = sorted(by_step)
            ys = [sum(by_step[s]) / len(by_step[s]) for s in steps]
            color = cmap(i / max(1, len(lines) - 1))
            if len(steps_seen) == 1:  # one forward (text models): one bar per layer, not a one-point axis
                ax.bar([i], ys, color=color, label=label)
            else:
                ax.plot(steps, ys, marker="o", markersize=3, color=color, label=label)
        ax.set_title(metric + (" (mean of each block's sites)" if by_block else ""))
        ax.set_xlabel("layer (model order)" if len(steps_seen) == 1 else "step")
        if lines:
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return fig
