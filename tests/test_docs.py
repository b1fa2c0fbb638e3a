"""The user docs stay true to the code: every relative link and heading anchor in README.md and docs/ resolves,
every `python -m lib_rebasin ...` command shown there parses with the real argument parsers, and CI runs the
README's test command verbatim."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from lib_rebasin.cli import build_parser
from lib_rebasin.ui import standalone

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```.*?```", re.DOTALL)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in _anchors(dest)):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def _commands() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for block in FENCE.findall(page.read_text(encoding="utf-8")):
            for line in block.splitlines():
                m = re.search(r"python -m lib_rebasin (.*)", line)
                if m and "[" not in m.group(1):  # a synopsis with [optional] parts is not one command
                    found.append((str(page.relative_to(ROOT)), m.group(1).split("#")[0].strip()))
    return found


@pytest.mark.parametrize("page,command", _commands())
def test_documented_commands_parse(page: str, command: str) -> None:
    args = shlex.split(command)
    parser: argparse.ArgumentParser = standalone.build_parser() if args[0] == "ui" else build_parser()
    try:
        parser.parse_args(args[1:] if args[0] == "ui" else args)
    except SystemExit as e:  # argparse's way of refusing; name the page and command instead
        pytest.fail(f"{page}: `python -m lib_rebasin {command}` does not parse ({e})")


def test_ci_runs_the_readmes_test_command_verbatim() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = next(line for line in readme.splitlines() if line.startswith("pip install") and "pytest" in line)
    assert command in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()


def _user_options() -> list:
    from lib_rebasin.options import OPTIONS

    return [o for o in OPTIONS.values() if o.user_input]


def test_every_option_and_method_is_documented() -> None:
    """The option table and the method registry make the CLI, recipes and the API; the pages that list them by hand
    must keep up (a new option or method fails here until its docs say it exists)."""
    from lib_rebasin.methods import METHODS

    pages = {name: (ROOT / "docs" / name).read_text(encoding="utf-8") for name in
             ("cli.md", "http-api.md", "recipes.md", "methods.md")}
    missing = []
    for option in _user_options():
        if option.cli and option.flag not in pages["cli.md"]:
            missing.append(f"cli.md: {option.flag}")
        for page in ("http-api.md", "recipes.md"):
            if f"`{option.name}`" not in pages[page] and not re.search(rf"\b{option.name}\b", pages[page]):
                missing.append(f"{page}: {option.name}")
    for method in METHODS:
        if f"`{method}`" not in pages["methods.md"]:
            missing.append(f"methods.md: {method}")
        if f"`{method}`" not in pages["cli.md"]:
            missing.append(f"cli.md: {method}")
    assert not missing, "undocumented: " + ", ".join(missing)
