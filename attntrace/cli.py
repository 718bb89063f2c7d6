"""The `attntrace` command line: run, demo, sites, observers, validate, schema, report.

Errors attntrace raises on purpose (`AttnTraceError`) print as one line, `attntrace: error: ...`,
with exit status 2 for bad input (configuration, selection, plugins) and 1 for failed runs;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .core.errors import AttnTraceError, ConfigError, PluginError, RunError, SelectionError

__all__ = ["main"]

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def _quiet_libraries() -> None:
    """Silence library chatter (progress bars of loading, optional-backend notices) for CLI output."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import diffusers.utils.logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except ImportError:
        pass
    try:
        import transformers.utils.logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


# -- commands -----------------------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    from .experiment.checks import check_experiment
    from .experiment.runner import plan_items
    from .experiment.spec import load_experiment

    exp = load_experiment(args.experiment, args.set)
    check_experiment(exp)  # missing model folder, unknown classes/kwargs, unreachable steps: exit 2
    items = len(plan_items(exp))
    rules = ", ".join(r.label for r in exp.trace.rules) or "no rules"
    print(
        f"{args.experiment}: valid experiment {exp.name!r}: {items} item(s), observers: {rules}, "
        f"output: {exp.output_dir}"
    )
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from .experiment.spec import experiment_schema

    print(json.dumps(experiment_schema(), indent=2))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .experiment.runner import run_experiment
    from .experiment.spec import load_experiment

    exp = load_experiment(args.experiment, args.set)  # first: a bad file fails fast, before heavy imports
    _quiet_libraries()
    if args.output:
        exp.output = args.output
    t0 = time.perf_counter()
    res = run_experiment(exp, force=args.force, progress=not args.no_progress)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(
            f"{exp.name}: {len(res.ran)} item(s) run, {len(res.skipped)} skipped (done), "
            f"{len(res.failed)} failed in {time.perf_counter() - t0:.1f} s"
        )
        print(
            f"results: {res.directory}  (manifest: {res.directory / 'manifest.json'}; "
            f"view: attntrace report {res.directory})"
        )
    return EXIT_FAILED if res.failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _quiet_libraries()
    kwargs = {"prompt": args.prompt} if args.prompt else {}
    run_demo(args.output, steps=args.steps, progress=not args.no_progress, **kwargs)
    return 0


def _load_for_sites(target: str, overrides: list[str] | None) -> tuple[Any, Any]:
    """(model, tracer-or-None) from an experiment YAML or a local model folder."""
    from .tracer import Tracer

    p = Path(target)
    if p.suffix in (".yaml", ".yml"):
        from .experiment.runner import load_model
        from .experiment.spec import load_experiment

        exp = load_experiment(p, overrides)
        model, _ = load_model(exp, "cpu")
        return model, Tracer(exp.trace)
    if not p.is_dir():
        raise ConfigError(f"{target} is neither an experiment YAML nor a local model folder")
    if (p / "model_index.json").is_file():
        import diffusers

        try:
            return diffusers.DiffusionPipeline.from_pretrained(p), None
        except (OSError, ValueError) as exc:
            raise RunError(f"cannot load the diffusers pipeline in {p}: {exc}") from None
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{p} has no model_index.json or config.json: not a diffusers/transformers folder")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if "_class_name" in cfg:  # a single diffusers model (unet, transformer...)
        import diffusers

        cls = getattr(diffusers, str(cfg["_class_name"]), None)
        if cls is None:
            raise ConfigError(f"diffusers has no model class {cfg['_class_name']!r} (from {cfg_path})")
        return cls.from_pretrained(p), None
    import transformers

    try:
        return transformers.AutoModel.from_pretrained(p), None
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot load a transformers model from {p}: {exc}") from None


def cmd_sites(args: argparse.Namespace) -> int:
    from .core.selection import pattern_matches
    from .tracer import find_sites

    _quiet_libraries()
    model, tracer = _load_for_sites(args.target, args.set)
    sites = find_sites(model)
    if args.match:
        sites = [s for s in sites if pattern_matches(args.match, s.name)]
    matches: dict[str, list[str]] = {}
    if tracer is not None:
        for e in tracer.entries:
            for s in sites:
                if e.matches(s):
                    matches.setdefault(s.name, []).append(e.label)
    with_notes = any(s.note for s in sites)  # the column only when some site has a limitation to state
    with_layout = any(s.layout for s in sites)  # how joint layouts are resolved (single-stream blocks...)
    rows = [
        [
            s.name,
            s.kind,
            *([s.layout] if with_layout else []),
            s.module_class,
            s.processor_class or "",
            str(s.heads or ""),
            ", ".join(matches.get(s.name, [])),
            *([s.note] if with_notes else []),
        ]
        for s in sites
    ]
    if args.json:
        print(json.dumps([{**s.as_row(), "rules": matches.get(s.name, [])} for s in sites], indent=1))
        return 0
    header = ["site", "kind", *(["layout"] if with_layout else []), "module", "processor", "heads", "rules",
              *(["note"] if with_notes else [])]  # fmt: skip
    print(_table(rows, header))
    print(f"{len(sites)} site(s)" + (f" matching {args.match!r}" if args.match else ""))
    for line in _untraceable(model, sites, filtered=bool(args.match)):
        print(line)
    return 0


def _untraceable(model: Any, sites: list[Any], *, filtered: bool) -> list[str]:
    """Why attention cannot be traced (fully or in part), naming the model class (a pipeline's denoiser)."""
    from .tracer import resolve_model

    cls = type(resolve_model(model)).__name__
    if not sites and not filtered:
        return [
            f"{cls}: no attention attntrace can trace: no diffusers attention module holding a processor, no "
            "transformers module calling the attention-function interface, no nn.MultiheadAttention and no "
            "module calling F.scaled_dot_product_attention or computing softmax attention by hand"
        ]
    lines = []
    no_probs: dict[str, int] = {}
    for s in sites:
        if not s.probs:
            key = f"{s.module_class} with {s.processor_class}" if s.processor_class else s.module_class
            no_probs[key] = no_probs.get(key, 0) + 1
    for key, n in sorted(no_probs.items()):
        lines.append(
            f"{cls}: {n} site(s) ({key}) compute linear attention: there is no probability matrix, so "
            "observers that need probs, and editors, are refused at attach there (q/k/v/output observers work)"
        )
    return lines


def cmd_observers(args: argparse.Namespace) -> int:
    from . import registry

    entries = registry.available(load=True)
    rows = []
    warnings_: list[str] = []
    for e in entries:
        if e.cls is None:
            warnings_.append(f"warning: observer {e.name!r} from {e.dist} ({e.target}) is broken: {e.error}")
            continue
        params = []
        for pname, field in e.cls.Params.model_fields.items():
            default = "required" if field.is_required() else repr(field.default)
            ann = getattr(field.annotation, "__name__", None) or str(field.annotation).replace("typing.", "")
            params.append(f"{pname}: {ann} = {default}")
        doc = (e.cls.__doc__ or "").strip().splitlines()
        rows.append(
            [
                e.name,
                e.dist,
                "editor" if e.cls.edits else "observer",
                "; ".join(params) or "-",
                doc[0] if doc else "",
            ]
        )
    print(_table(rows, ["name", "from", "type", "parameters", "description"]))
    for w in warnings_:
        print(w, file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report.html import write_report

    index = write_report(args.run_dir, max_mb=args.max_mb)
    size = index.stat().st_size / 1e6
    print(f"report: {index}  ({size:.1f} MB, self-contained: open it in a browser, no server needed)")
    return 0


# -- parser -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attntrace", description="See and change what happens inside attention layers."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def with_set(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--set",
            action="append",
            metavar="A.B=VALUE",
            default=[],
            help="override a field of the experiment (value parsed as YAML); repeatable",
        )

    p = sub.add_parser("run", help="run an experiment YAML file")
    p.add_argument("experiment", help="experiment YAML file")
    with_set(p)
    p.add_argument("--force", action="store_true", help="redo items that are already done")
    p.add_argument("--output", help="run directory (overrides the file's `output`)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="offline demo on the toy-world pipeline and MiniLM (under a minute on CPU)")
    p.add_argument("--output", default="runs/demo", help="where to write (default: runs/demo)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    p.add_argument("--prompt", help="toy-world prompt (default: 'a red circle left of a yellow square')")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("sites", help="list the attention sites of a model folder or an experiment's model")
    p.add_argument("target", metavar="MODEL_OR_EXP", help="local model folder or experiment YAML")
    p.add_argument("--match", metavar="GLOB", help="only sites whose name matches GLOB")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    with_set(p)
    p.set_defaults(func=cmd_sites)

    p = sub.add_parser("observers", help="list built-in and plugin observers with their parameters")
    p.set_defaults(func=cmd_observers)

    p = sub.add_parser("validate", help="validate an experiment YAML file without running it")
    p.add_argument("experiment")
    with_set(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("schema", help="print the JSON Schema of experiment files")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("report", help="write a static, self-contained HTML explorer (index.html) for a run directory")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--max-mb",
        type=float,
        default=100.0,
        help="bound on the page's size; per-head and per-step detail is thinned to fit (default 100)",
    )
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `attntrace` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    logging.basicConfig(level=logging.WARNING, format="attntrace: %(levelname)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(
            "attntrace: interrupted; finished items are recorded in the manifest (re-run to resume)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except AttnTraceError as exc:
        if args.debug:
            traceback.print_exc()
        else:
            print(f"attntrace: error: {exc}", file=sys.stderr)
        bad_input = isinstance(exc, (ConfigError, SelectionError, PluginError))
        return EXIT_BAD_INPUT if bad_input else EXIT_FAILED
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
