"""Plugins through the `attntrace.observers` entry-point group, with real (throwaway) distributions.

Each test writes distributions as `NAME-0.1.dist-info/` folders (METADATA + entry_points.txt) plus
their modules into a temporary directory, puts it on `sys.path`, and calls `registry.refresh()`:
exactly what `importlib.metadata` sees after a `pip install --target`.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny import run, sd15_unet

from attntrace import ConfigError, PluginError, TraceConfig, Tracer, UnknownObserverError, registry

GOOD = """
from attntrace import Observer

class CountCalls(Observer):
    '''Counts calls per site. Keeps one int per site.'''
    needs = frozenset()
    def __init__(self, params=None, **kw):
        super().__init__(params, **kw)
        self.counts = {}
    def on_call(self, call):
        self.counts[call.site] = self.counts.get(call.site, 0) + 1
    def result(self):
        return dict(self.counts)
"""

BROKEN = """
import attntrace_missing_dependency_xyz  # not installed: the import fails
"""

NOT_OBSERVER = """
class NotAnObserver:
    pass
"""

MARKER = """
import os
from pathlib import Path
from attntrace import Observer
Path(os.environ["TP_MARKER_FILE"]).write_text("imported")

class Marker(Observer):
    pass
"""

DUP = """
from attntrace import Observer

class Dup(Observer):
    tag = {tag!r}
"""


def make_dist(root: Path, dist: str, entries: dict[str, str], modules: dict[str, str]) -> None:
    """Write one installed distribution: its dist-info folder and its modules."""
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entries.items())
    (info / "entry_points.txt").write_text(f"[attntrace.observers]\n{lines}\n")
    for name, src in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(src))


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / "site"
    make_dist(root, "tp-good", {"tp_good": "tp_good_mod:CountCalls"}, {"tp_good_mod": GOOD})
    make_dist(root, "tp-broken", {"tp_broken": "tp_broken_mod:Whatever"}, {"tp_broken_mod": BROKEN})
    make_dist(root, "tp-notobs", {"tp_notobs": "tp_notobs_mod:NotAnObserver"},
              {"tp_notobs_mod": NOT_OBSERVER})  # fmt: skip
    make_dist(root, "tp-dup-a", {"tp_dup": "tp_dup_a_mod:Dup"}, {"tp_dup_a_mod": DUP.format(tag="a")})
    make_dist(root, "tp-dup-b", {"tp_dup": "tp_dup_b_mod:Dup"}, {"tp_dup_b_mod": DUP.format(tag="b")})
    make_dist(root, "tp-badvalue", {"tp_badvalue": "no_colon_here"}, {})
    monkeypatch.syspath_prepend(str(root))
    registry.refresh()
    yield root
    monkeypatch.undo()
    for mod in [m for m in sys.modules if m.startswith("tp_")]:
        del sys.modules[mod]
    registry.refresh()


def test_good_plugin_loads_and_traces(plugin_dir: Path) -> None:
    cls = registry.get("tp_good")
    assert cls.__module__ == "tp_good_mod" and cls.name == "tp_good"  # the registry names it
    model, inputs = sd15_unet()
    sites = [s.name for s in Tracer().sites(model) if s.name.endswith("attn2")]
    tracer = Tracer(TraceConfig.from_yaml("rules:\n  - use: tp_good\n    match: '*attn2'\n"))
    with tracer.attach(model):
        run(model, inputs)
        run(model, inputs)
    counts = tracer.results()["tp_good"]
    assert sorted(counts) == sorted(sites) and set(counts.values()) == {2}


def test_broken_plugin_error_names_dist_entry_point_and_cause(plugin_dir: Path) -> None:
    with pytest.raises(PluginError) as info:
        registry.get("tp_broken")
    msg = str(info.value)
    assert "tp-broken" in msg and "tp_broken_mod:Whatever" in msg
    assert "ModuleNotFoundError" in msg and "attntrace_missing_dependency_xyz" in msg
    # From YAML it is a ConfigError at the field path, carrying the same cause.
    with pytest.raises(ConfigError, match=r"rules\.0\.use: .*tp-broken.*ModuleNotFoundError"):
        TraceConfig.from_yaml("rules:\n  - use: tp_broken\n")
    # The other plugins keep working, before and after.
    assert registry.get("tp_good").__name__ == "CountCalls"


def test_not_an_observer_is_rejected(plugin_dir: Path) -> None:
    expected = r"tp-notobs.*tp_notobs_mod:NotAnObserver.*not an attntrace\.Observer"
    with pytest.raises(PluginError, match=expected):
        registry.get("tp_notobs")
    with pytest.raises(PluginError, match=r"tp-badvalue.*not of the form 'module:Class'"):
        registry.get("tp_badvalue")
    assert registry.get("tp_good").__name__ == "CountCalls"


def test_duplicate_names_name_both_and_dist_prefix_selects(plugin_dir: Path) -> None:
    with pytest.raises(PluginError) as info:
        registry.get("tp_dup")
    msg = str(info.value)
    assert "tp-dup-a" in msg and "tp-dup-b" in msg and "tp_dup_a_mod:Dup" in msg and "tp_dup_b_mod:Dup" in msg
    assert "DIST:tp_dup" in msg
    assert registry.get("tp-dup-a:tp_dup").tag == "a"
    assert registry.get("tp-dup-b:tp_dup").tag == "b"
    assert registry.get("tp_dup_b:tp_dup").tag == "b"  # PEP 503: '_' and '-' name the same distribution
    cfg = TraceConfig.from_yaml("rules:\n  - use: 'tp-dup-a:tp_dup'\n")
    assert Tracer(cfg).observers["tp-dup-a:tp_dup"].tag == "a"
    with pytest.raises(UnknownObserverError):
        registry.get("tp-dup-c:tp_dup")


def test_listing_reports_broken_plugins_without_failing(plugin_dir: Path) -> None:
    entries = {(e.dist, e.name): e for e in registry.available()}
    assert ("tp-good", "tp_good") in entries and ("attntrace", "shapes") in entries
    # Listing imports nothing.
    assert all(e.cls is None for (d, _), e in entries.items() if d.startswith("tp-"))
    loaded = {(e.dist, e.name): e for e in registry.available(load=True)}
    assert loaded[("tp-good", "tp_good")].error is None and loaded[("tp-good", "tp_good")].cls is not None
    assert "ModuleNotFoundError" in (loaded[("tp-broken", "tp_broken")].error or "")
    assert "not an attntrace.Observer" in (loaded[("tp-notobs", "tp_notobs")].error or "")


def test_refresh_sees_plugins_added_later(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry.refresh()
    with pytest.raises(UnknownObserverError):
        registry.get("tp_late")
    root = tmp_path / "late"
    make_dist(root, "tp-late", {"tp_late": "tp_late_mod:CountCalls"}, {"tp_late_mod": GOOD})
    monkeypatch.syspath_prepend(str(root))
    registry.refresh()
    try:
        assert registry.get("tp_late").__name__ == "CountCalls"
    finally:
        monkeypatch.undo()
        sys.modules.pop("tp_late_mod", None)
        registry.refresh()
    with pytest.raises(UnknownObserverError):
        registry.get("tp_late")


def test_importing_attntrace_loads_no_plugin(tmp_path: Path) -> None:
    root = tmp_path / "site"
    make_dist(root, "tp-marker", {"tp_marker": "tp_marker_mod:Marker"}, {"tp_marker_mod": MARKER})
    marker = tmp_path / "imported.txt"
    repo = Path(__file__).resolve().parents[1]
    code = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        import attntrace
        from attntrace import registry, TraceConfig
        marker = Path(sys.argv[1])
        names = [e.name for e in registry.available()]   # listing: no import
        TraceConfig.from_yaml("rules:\\n  - use: shapes\\n")  # other names: no import
        assert "tp_marker" in names, names
        assert not marker.exists() and "tp_marker_mod" not in sys.modules, "plugin imported too early"
        registry.get("tp_marker")
        assert marker.read_text() == "imported"
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(root)]), "TP_MARKER_FILE": str(marker)}
    out = subprocess.run([sys.executable, "-c", code, str(marker)], env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_register_from_python_needs_an_observer() -> None:
    with pytest.raises(PluginError):
        registry.register("nope", int)  # type: ignore[arg-type]
    assert registry.get("attntrace:shapes") is importlib.import_module("attntrace.observers.shapes").Shapes
