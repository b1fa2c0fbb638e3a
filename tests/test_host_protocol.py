"""Every host class satisfies the tab's `Host` protocol: each member exists, and each method takes the protocol's
arguments (same names, kinds and count; extra parameters only with defaults) and, where annotated, returns what the
protocol promises.

`isinstance(obj, Host)` with `runtime_checkable` only looks for the names, and only on an instance; this looks at
the signatures, on the classes, so a method lost inside another function (never bound to the class) or one taking
other arguments fails here instead of in front of a user. Hosts: `BaseHost` and the standalone app's host in
`lib_rebasin/ui/`, and the WebUI adapter's host in `scripts/rebasin_tab.py`, loaded against the stand-in WebUI in
`tests/webui_standin/` the way tests/test_webui_adapter.py loads it.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import sys
import typing
from pathlib import Path
from typing import Any

import pytest

from lib_rebasin.ui.host import BaseHost, Host
from lib_rebasin.ui.standalone import StandaloneHost

ROOT = Path(__file__).resolve().parents[1]
STANDIN = Path(__file__).resolve().parent / "webui_standin"


def protocol_members(proto: type) -> tuple[list[str], list[str]]:
    """(methods, data attributes) the protocol declares, its own and its bases' (typing's machinery left out)."""
    methods: list[str] = []
    attributes: list[str] = []
    for klass in reversed(proto.__mro__):
        if klass is object or klass.__module__ == "typing" or not getattr(klass, "_is_protocol", False):
            continue
        for name in getattr(klass, "__annotations__", {}):
            if not name.startswith("_") and name not in attributes:
                attributes.append(name)
        for name, value in vars(klass).items():
            if not name.startswith("_") and callable(value) and name not in methods:
                methods.append(name)
    return methods, attributes


def _annotation(value: Any) -> str | None:
    """An annotation as its source text (hosts written with and without `from __future__ import annotations`)."""
    if value is inspect.Signature.empty:
        return None
    return value if isinstance(value, str) else inspect.formatannotation(value)


def signature_problems(proto: type, name: str, impl: Any) -> list[str]:
    """Why `impl` cannot stand in for the protocol's method `name` (empty when it can)."""
    if not inspect.isfunction(impl):
        return [f"{name} is {type(impl).__name__}, not a method"]
    want = list(inspect.signature(getattr(proto, name)).parameters.values())[1:]  # after self
    have = list(inspect.signature(impl).parameters.values())[1:]
    problems = []
    for i, p in enumerate(want):
        if i >= len(have):
            if not any(h.kind is h.VAR_POSITIONAL for h in have):
                problems.append(f"{name} takes no parameter {p.name!r} (the protocol's argument {i + 1})")
            continue
        h = have[i]
        if h.kind is h.VAR_POSITIONAL:
            continue
        if h.kind not in (h.POSITIONAL_ONLY, h.POSITIONAL_OR_KEYWORD):
            problems.append(f"{name}: argument {i + 1} {p.name!r} cannot be passed by position ({h.kind.description})")
        elif h.name != p.name and p.kind is p.POSITIONAL_OR_KEYWORD:
            problems.append(f"{name}: argument {i + 1} is {h.name!r}, the protocol calls it {p.name!r}")
    for h in have[len(want):]:
        if h.default is h.empty and h.kind not in (h.VAR_POSITIONAL, h.VAR_KEYWORD):
            problems.append(f"{name}: extra parameter {h.name!r} has no default (the protocol never passes it)")
    want_ret = _annotation(inspect.signature(getattr(proto, name)).return_annotation)
    have_ret = _annotation(inspect.signature(impl).return_annotation)
    if have_ret is not None and have_ret != want_ret:
        problems.append(f"{name} returns {have_ret}, the protocol {want_ret}")
    return problems


def host_problems(cls: type, proto: type = Host) -> list[str]:
    """Everything that keeps `cls` from satisfying `proto`."""
    methods, attributes = protocol_members(proto)
    problems = []
    hints = typing.get_type_hints(proto)
    for name in attributes:
        if not hasattr(cls, name):
            problems.append(f"no attribute {name!r}")
        elif isinstance(hints.get(name), type):
            value = inspect.getattr_static(cls, name)
            if isinstance(value, property):  # read on an instance: the getter's declared type must match
                returns = typing.get_type_hints(value.fget).get("return") if value.fget else None
                if returns is not None and returns is not hints[name]:
                    problems.append(f"{name} returns {returns}, the protocol {hints[name].__name__}")
            elif not isinstance(value, hints[name]):
                problems.append(f"{name} is {type(value).__name__}, the protocol {hints[name].__name__}")
    for name in methods:
        impl = inspect.getattr_static(cls, name, None)
        if impl is None:
            problems.append(f"no method {name}()")
        else:
            problems.extend(signature_problems(proto, name, impl))
    return problems


def test_protocol_members_are_all_seen():
    methods, attributes = protocol_members(Host)
    assert attributes == ["name", "shows_eta", "page_selects_checkpoint", "loads_in_memory"]
    assert {"list_checkpoints", "run_job", "load_checkpoint", "ready_upscalers", "list_vaes"} <= set(methods)
    assert len(methods) == len(set(methods)) >= 19


class _Broken(BaseHost):
    name = 7

    def run_job(self, work):  # one argument missing
        work()

    def load_checkpoint(self, checkpoint: Path) -> str:  # renamed: a keyword call would fail
        return ""

    def report_progress(self, fraction: float, text: str, eta: float) -> None:  # an extra one without default
        pass

    def interrupted(self) -> str:  # another return type
        return ""

    defaults = ("method", "rebasin")  # not a method


def test_the_check_reports_each_kind_of_mismatch():
    problems = "\n".join(host_problems(_Broken))
    assert "run_job takes no parameter 'work'" in problems
    assert "run_job: argument 1 is 'work', the protocol calls it 'job_id'" in problems
    assert "load_checkpoint: argument 1 is 'checkpoint', the protocol calls it 'path'" in problems
    assert "report_progress: extra parameter 'eta' has no default" in problems
    assert "interrupted returns str, the protocol bool" in problems
    assert "defaults is tuple, not a method" in problems
    assert "name is int, the protocol str" in problems

    class Empty:
        pass

    assert "no attribute 'name'" in host_problems(Empty)
    assert "no method ready_upscalers()" in host_problems(Empty)


def test_every_host_class_is_checked():
    """A new host (a subclass of BaseHost in the package or the adapter) must be added to the checks below."""
    found = set()
    for path in [*ROOT.joinpath("lib_rebasin").rglob("*.py"), *ROOT.joinpath("scripts").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and any(ast.unparse(b).endswith("BaseHost") for b in node.bases):
                found.add(node.name)
    assert found == {"StandaloneHost", "WebUIHost"}


@pytest.mark.parametrize("cls", [BaseHost, StandaloneHost], ids=lambda c: c.__name__)
def test_core_hosts_satisfy_the_protocol(cls):
    assert host_problems(cls) == []


def _drop_standin_modules():
    for name in list(sys.modules):
        if name.split(".")[0] in ("modules", "modules_forge", "rebasin_webui") or name in ("launch", "rebasin_tab.py"):
            del sys.modules[name]


@pytest.mark.ui  # also run by tests/ui_envs.sh under each supported gradio (CI's [test] venv has no gradio)
def test_webui_host_satisfies_the_protocol(monkeypatch):
    pytest.importorskip("gradio")
    _drop_standin_modules()
    monkeypatch.syspath_prepend(str(STANDIN))
    try:
        spec = importlib.util.spec_from_file_location("rebasin_tab.py", ROOT / "scripts" / "rebasin_tab.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        assert issubclass(mod.WebUIHost, BaseHost)
        assert host_problems(mod.WebUIHost) == []
        assert isinstance(mod.HOST, Host)
    finally:
        _drop_standin_modules()
