"""Hostile experiment documents through the real command line: `attntrace validate` and `attntrace run`.

Random and mutated experiment files (wrong types, unknown keys, huge numbers, negative steps, empty
globs, non-UTF-8 bytes, alias bombs, `!!python/...` tags, bad `--set` overrides) must never give a
Python traceback: only exit status 2 and one line `attntrace: error: <field>: ...` (or, for a
document that is valid, the model-loading error of `run`, also one line). Most examples call
`attntrace.cli.main` in process (same code path as the console script); a handful run
`python -m attntrace` as real subprocesses.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attntrace.cli import main

ROOT = Path(__file__).resolve().parents[1]
N_EXAMPLES = 300
tried = {"documents": 0, "rejected": 0, "valid": 0, "invocations": 0}

BASE: dict[str, Any] = {
    "name": "fuzz",
    "model": {"pipeline": "StableDiffusionPipeline", "path": "MODEL", "dtype": "float32", "device": "cpu"},
    "inputs": {"prompts": ["a cat"], "seeds": [0, 1], "steps": 2, "guidance_scale": 5.0, "height": 64, "width": 64},
    "trace": {
        "rules": [
            {"use": "shapes", "match": "*attn2", "kind": "cross", "steps": "0:2"},
            {"use": "stats", "match": ["*attn1"], "kind": ["self"], "steps": [0, 1], "with": {"max_chunk_mib": 8}},
        ],
        "strict": True,
        "on_error": "raise",
    },
    "output": "runs/{name}",
}  # fmt: skip

BAD_VALUES: list[Any] = [
    None, True, False, 0, -1, -3, 10**30, -(10**30), 2**63, 1e308, float("inf"), float("-inf"), float("nan"),
    "", " ", "*", "\x00", "é", "a" * 5000, "0:10:2", "-1", "::", "a:b:c:d", "raise", "AutoModel",
    [], [None], [[]], ["*"], [""], [-1, 2], {}, {"x": 1}, {"start": 5, "stop": 2, "step": 0}, {"": None},
]  # fmt: skip
UNKNOWN_KEYS: list[Any] = ["bogus", "Use", "", "steps ", "0", "with.x", "\t", 1, None, True, 2.5]


def paths_of(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (tuple of keys/indices) inside a document, the root excluded."""
    out: list[tuple[Any, ...]] = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        out.append((*prefix, k))
        out += paths_of(v, (*prefix, k))
    return out


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        doc = doc[k]
    return doc


SCHEMA_KEYS = ["name", "model", "inputs", "trace", "output", "pipeline", "path", "prompts", "seeds", "steps",
               "rules", "use", "match", "kind", "with", "texts", "on_error"]  # fmt: skip
random_keys = st.sampled_from(SCHEMA_KEYS) | st.text(max_size=5) | st.integers() | st.none() | st.booleans()
random_docs = st.recursive(
    st.sampled_from(BAD_VALUES[:26]) | st.integers() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(random_keys, c, max_size=4),
    max_leaves=10,
)


@st.composite
def mutated_docs(draw: st.DrawFn) -> tuple[Any, list[tuple[str, tuple[Any, ...], Any]]]:
    """The base experiment with 1-3 mutations: replace a value, delete a key, add an unknown key."""
    if draw(st.integers(0, 9)) == 0:  # now and then a wholly random document
        return draw(random_docs), [("random", (), None)]
    doc = copy.deepcopy(BASE)
    done = []
    for _ in range(draw(st.integers(0, 3))):
        paths = paths_of(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "replace", "delete", "unknown"]))
        parent = _get(doc, path[:-1])
        if op == "replace":
            value = draw(st.sampled_from(BAD_VALUES) | st.integers() | st.text(max_size=6) | st.floats())
            if path == ("model", "path") and isinstance(value, str):
                value = "MODEL" + value  # never a hub id: `run` must not touch the network
            parent[path[-1]] = value
        elif op == "delete":
            if isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent.pop(path[-1])
        else:
            target = _get(doc, path)
            if not isinstance(target, dict):
                target = parent if isinstance(parent, dict) else doc
                path = path[:-1] if isinstance(parent, dict) else ()
            key = draw(st.sampled_from(UNKNOWN_KEYS))
            target[key] = draw(st.sampled_from(BAD_VALUES[:8]))
        done.append((op, path, parent))
    return doc, [(op, path, None) for op, path, _ in done]


def alias_bomb(levels: int = 9) -> str:
    lines = ["  a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(levels - 1):
        lines.append(f"  {chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]")
    return "bomb:\n" + "\n".join(lines) + "\n"


def to_bytes(doc: Any, transform: str, noise: bytes, at: int, model: str) -> bytes:
    """Serialise `doc` and apply a text-level transformation."""
    text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False).replace("MODEL", model)
    if transform == "python-tag":
        pwned = Path(model).parent / "pwned"
        text = text.replace("name: fuzz", f"name: !!python/object/apply:os.system ['touch {pwned}']", 1)
        text += f"extra: !!python/object/new:pathlib.Path ['{pwned}']\n"
    elif transform == "alias-bomb":
        text = alias_bomb() + text.replace("steps: 2", "steps: *i", 1)
    elif transform == "recursive-alias":  # a structure containing itself
        text = text.replace("- a cat", "- &r [*r]", 1)
    elif transform == "alias-small":  # a legal alias expanding a bit: the field must still be named
        text = "x: &p ['a cat', 'a dog']\n" + text.replace("- a cat", "- *p", 1)
    data = text.encode("utf-8")
    if transform == "bytes":
        data = data[:at] + noise + data[at + len(noise) // 2 :]
    elif transform == "non-utf8":
        data = data[:at] + b"\xff\xfe\xc3(" + data[at:]
    return data


overrides = st.lists(
    st.tuples(
        st.sampled_from(["inputs.steps", "inputs.seeds", "trace.rules.0.steps", "trace.rules.7.use", "name",
                         "trace.rules.0.with.print_table", "", "a..b", "model.dtype", "inputs.prompts.0.x",
                         "trace.strict"]),
        st.sampled_from(["-1", "1e999", "[1, 2", "{a: b}", "", "!!python/object/apply:os.system [ls]", "null",
                         "99999999999999999999", "'*'", "\xff", "&a [*a]", "&m {k: *m}"]),
    ).map(lambda kv: f"{kv[0]}={kv[1]}" if kv[0] or kv[1] != "\xff" else "no-equals-sign"),
    max_size=2,
)  # fmt: skip


def invoke(argv: list[str]) -> tuple[int, str, str]:
    """`attntrace ARGV` in process: (exit status, stdout, stderr). Any escaping exception fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse usage errors
            rc = int(exc.code or 0)
    tried["invocations"] += 1
    return rc, out.getvalue(), err.getvalue()


def one_error_line(rc: int, out: str, err: str, codes: tuple[int, ...] = (2,)) -> str:
    assert "Traceback" not in out + err, err
    assert rc in codes, (rc, out, err)
    assert out == "", out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("attntrace: error: "), err
    return lines[0].removeprefix("attntrace: error: ")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli-fuzz")


@settings(
    max_examples=N_EXAMPLES, derandomize=True, database=None, deadline=None,
    suppress_health_check=list(HealthCheck),
)  # fmt: skip
@given(
    mutated_docs(),
    st.sampled_from(["plain"] * 4 + ["bytes", "non-utf8", "python-tag", "alias-bomb", "alias-small",
                     "recursive-alias"]),
    st.binary(min_size=1, max_size=40),
    st.integers(0, 400),
    overrides,
)
def test_hostile_experiments_through_cli(work: Path, mutated: Any, transform: str, noise: bytes, at: int,
                                         sets: list[str]) -> None:  # fmt: skip
    doc, mutations = mutated
    n = tried["documents"]
    tried["documents"] += 1
    model = str(work / "no-such-model")
    path = work / f"exp{n % 4}.yaml"
    path.write_bytes(to_bytes(doc, transform, noise, at, model))
    set_args = [a for s in sets for a in ("--set", s)]
    rc, out, err = invoke(["validate", str(path), *set_args])
    assert "Traceback" not in out + err
    if rc == 0:
        tried["valid"] += 1
        assert err == "" and len(out.splitlines()) == 1 and "valid experiment" in out, (out, err)
        # A valid document: `run` gets as far as loading the (absent) model; one line, exit 1 or 2.
        run_rc, run_out, run_err = invoke(["run", str(path), *set_args, "--no-progress", "--output",
                                           str(work / "out" / str(n))])  # fmt: skip
        one_error_line(run_rc, run_out, run_err, codes=(1, 2))
    else:
        tried["rejected"] += 1
        message = one_error_line(rc, out, err)
        # `run` refuses the same document with the same line, before doing anything.
        run_rc, run_out, run_err = invoke(["run", str(path), *set_args, "--no-progress", "--output",
                                           str(work / "out" / str(n))])  # fmt: skip
        assert (run_rc, run_out, run_err) == (rc, out, err)
        assert not (work / "out" / str(n)).exists()  # nothing written for a refused document
        if transform == "plain" and not sets and len(mutations) == 1 and mutations[0][0] == "unknown":
            # The only defect is an unknown key: the message names its parent's path.
            parent = ".".join(str(p) for p in mutations[0][1])
            assert message.startswith(parent), (message, parent)
    assert not (work / "pwned").exists()  # a python tag never ran


FIELD_CASES = [
    (["inputs", "steps"], -5, "inputs.steps"),
    (["inputs", "steps"], 10**30, "inputs.steps"),
    (["inputs", "seeds"], [], "inputs.seeds"),
    (["inputs", "seeds"], ["x"], "inputs.seeds.0"),
    (["inputs", "height"], 1.5, "inputs.height"),
    (["inputs", "guidance_scale"], -1, "inputs.guidance_scale"),
    (["model", "dtype"], "float64", "model.dtype"),
    (["model", "device"], "tpu", "model.device"),
    (["model", "pipeline"], "not a class", "model.pipeline"),
    (["model", "bogus"], 1, "model.bogus"),
    (["name"], 5, "name"),
    (["name"], "", "name"),
    (["output"], [], "output"),
    (["trace", "rules", 0, "steps"], -1, "trace.rules.0.steps"),
    (["trace", "rules", 0, "steps"], "0:10:0", "trace.rules.0.steps"),
    (["trace", "rules", 0, "match"], "", "trace.rules.0.match"),
    (["trace", "rules", 0, "match"], [], "trace.rules.0.match"),
    (["trace", "rules", 0, "kind"], "banana", "trace.rules.0.kind"),
    (["trace", "rules", 0, "use"], "nope", "trace.rules.0.use"),
    (["trace", "rules", 1, "with", "max_chunk_mib"], -1, "trace.rules.1.with.max_chunk_mib"),
    (["trace", "rules", 1, "with", "bogus"], 1, "trace.rules.1.with.bogus"),
    (["trace", "on_error"], "explode", "trace.on_error"),
    (["trace", "rules"], {"use": "shapes"}, "trace.rules"),
    (["trace", 1], "x", "trace"),  # was a TypeError traceback: non-text key in the trace section
    (["trace", "rules", 0, None], "x", "trace.rules.0.None"),
    (["inputs", 2.5], 3, "inputs.'2.5'"),
]


@pytest.mark.parametrize(("where", "value", "field"), FIELD_CASES, ids=[c[2] + "=" + repr(c[1])[:12]
                                                                       for c in FIELD_CASES])  # fmt: skip
def test_each_bad_field_is_named(work: Path, where: list[Any], value: Any, field: str) -> None:
    doc = copy.deepcopy(BASE)
    _get(doc, tuple(where[:-1]))[where[-1]] = value
    path = work / "field.yaml"
    path.write_text(yaml.safe_dump(doc).replace("MODEL", str(work / "no-such-model")))
    for cmd in ("validate", "run"):
        message = one_error_line(*invoke([cmd, str(path)]))
        assert message.startswith(field + ":"), message


# A handful of the nastiest documents through real `python -m attntrace` processes.
def _subprocess_docs(model: str, pwned: Path) -> dict[str, bytes]:
    good = yaml.safe_dump(BASE).replace("MODEL", model)
    return {
        "python-tag": good.replace("name: fuzz", f"name: !!python/object/apply:os.system ['touch {pwned}']").encode(),
        "alias-bomb": (alias_bomb() + good.replace("steps: 2", "steps: *i", 1)).encode(),
        "non-utf8": good.encode().replace(b"a cat", b"a \xff\xfe cat"),
        "negative-steps": good.replace("steps: 2", "steps: -2").encode(),
        "empty-glob": good.replace("match: '*attn2'", "match: ''").encode(),
    }


@pytest.mark.parametrize(("case", "cmd"), [("python-tag", "validate"), ("alias-bomb", "run"),
                                           ("non-utf8", "validate"), ("negative-steps", "run"),
                                           ("empty-glob", "validate")])  # fmt: skip
def test_real_subprocess_one_line(work: Path, case: str, cmd: str) -> None:
    pwned = work / "pwned-sub"
    path = work / f"sub-{case}.yaml"
    path.write_bytes(_subprocess_docs(str(work / "no-such-model"), pwned)[case])
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "attntrace", cmd, str(path)], capture_output=True, text=True,
                       env=env, cwd=work, timeout=120)  # fmt: skip
    tried["documents"] += 1
    tried["rejected"] += 1
    message = one_error_line(r.returncode, r.stdout, r.stderr)
    expected = {"alias-bomb": "alias bomb", "non-utf8": "not UTF-8", "negative-steps": "inputs.steps:",
                "empty-glob": "trace.rules.0.match:", "python-tag": "could not determine a constructor"}  # fmt: skip
    assert expected[case] in message, message
    assert not pwned.exists()


def test_report_documents_tried() -> None:
    print(f"hostile experiment documents through the CLI: {tried['documents']} "
          f"({tried['rejected']} rejected with exit 2, {tried['valid']} valid; {tried['invocations']} in-process "
          f"invocations)")  # fmt: skip
