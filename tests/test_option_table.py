"""Every method and every option of the table reaches every interface, with no code per option or per method.

For each method and each option that applies to it, a value other than the default (chosen from the option's
declaration alone) goes through the CLI, a recipe (written and parsed back), an output's provenance (recorded and
read back by `recipe --from`) and the HTTP request, and must come out as the same MergeOptions. A method or an
option added to the table is covered here without an edit. No model files: only the options are checked.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from lib_rebasin.cli import _options, build_parser
from lib_rebasin.errors import RebasinError
from lib_rebasin.methods import METHODS
from lib_rebasin.option import Option
from lib_rebasin.options import OPTIONS, MergeOptions, options_for
from lib_rebasin.recipe.format import ModelRef, Recipe, Step, step_options
from lib_rebasin.recipe.from_output import _single_merge_recipe
from lib_rebasin.recipe.parse import parse_recipe
from lib_rebasin.recipe.provenance import recorded_options
from lib_rebasin.ui.request import MergeRequest, method_listing

# The one option whose text form is not its value: block weights are written as a preset name (or 26 numbers).
BLOCKS_TEXT = "GRAD_V"


def _sample(opt: Option, info: Any) -> Any:
    """A valid value other than the default, from the declaration alone (None: the option has none to offer,
    e.g. a device, whose other values depend on the machine)."""
    if opt.name == "blocks":
        return BLOCKS_TEXT
    if opt.kind is bool:
        return not opt.default
    if opt.kind in (int, float):
        low, high = opt.bounds(info)
        if opt.kind is int:
            return opt.default + 1 if high is None or opt.default + 1 <= high else opt.default - 1
        return (opt.default + high) / 2 if high is not None else opt.default + 1.0
    if opt.kind is str and opt.choices:
        return next(c for c in opt.choices if c != opt.default)
    if opt.kind is tuple and opt.choices:
        return (opt.choices[0],)
    return None


CONTEXTS: list[dict[str, Any]] = [{}, {"align": True}]  # an option that needs the merge to align gets align too


def _cases() -> list[tuple[str, str]]:
    return [(method, opt.name) for method in METHODS for opt in options_for(method)
            if opt.user_input and opt.name != "method" and _sample(opt, METHODS[method]) is not None]


def _settings(method: str, name: str) -> dict[str, Any]:
    """{option: value} with `name` set to its sample and what it needs, valid for `method`."""
    sample = _sample(OPTIONS[name], METHODS[method])
    for context in CONTEXTS:
        settings = {"method": method, **context, name: sample}
        try:
            _merge_options(settings).validate()
        except RebasinError:
            continue
        return settings
    raise AssertionError(f"{name} = {sample!r} is refused for {method} in every context: {CONTEXTS}")


def _merge_options(settings: dict[str, Any]) -> MergeOptions:
    return step_options(settings)  # block weights as text, like every interface gives them


def _cli_args(settings: dict[str, Any]) -> list[str]:
    args = ["merge", "a.safetensors", "b.safetensors", "-o", "out.safetensors"]
    for name, value in settings.items():
        flag = OPTIONS[name].flag
        if isinstance(value, bool):
            args += [flag] if value else []
        elif isinstance(value, tuple):
            args += [flag, ",".join(value)]
        else:
            args += [flag, str(value)]
    return args


CASES = _cases()


def test_every_method_and_option_is_covered():
    assert {m for m, _ in CASES} == set(METHODS)
    covered = {n for _, n in CASES}
    assert covered == {o.name for o in OPTIONS.values()
                       if o.user_input and o.name != "method"
                       and any(_sample(o, m) is not None for m in METHODS.values() if o.applies_to(m))}


@pytest.mark.parametrize("method,name", CASES)
def test_option_reaches_every_interface(method: str, name: str) -> None:
    settings = _settings(method, name)
    expected = _merge_options(settings)
    expected.validate()

    # CLI
    args = build_parser().parse_args(_cli_args(settings))
    assert _options(args, args.method) == expected

    # recipe: written and parsed back, the options it records are the same
    step = Step("s", expected, "a", "b", "c" if METHODS[method].needs_c else None)
    models = {k: ModelRef(k, f"{k}.safetensors") for k in ("a", "b", "c")}
    text = Recipe(name="r", models=models, steps=[step]).to_toml()
    parsed = parse_recipe(text).steps[0].options
    assert recorded_options(parsed) == recorded_options(expected), text
    if OPTIONS[name].recorded(expected):
        assert f"\n{name} = " in text

    # provenance: recorded in an output's metadata (JSON) and read back as a recipe by `recipe --from`
    record = json.loads(json.dumps({**recorded_options(expected), "models": {"A": "a.safetensors",
                                                                            "B": "b.safetensors", "C": "c"}}))
    from_output = parse_recipe(_single_merge_recipe("out", record, {})).steps[0].options
    assert recorded_options(from_output) == recorded_options(expected)

    # HTTP request: the JSON body, as a client sends it
    body = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
    assert MergeRequest.from_dict(json.loads(json.dumps(body))).options() == expected


def test_cli_help_and_api_listing_name_every_option_of_every_method():
    merge = build_parser()._subparsers._group_actions[0].choices["merge"]  # type: ignore[union-attr]
    text = merge.format_help()
    listing = {m["name"]: m for m in method_listing()}
    assert set(listing) == set(METHODS)
    for method, info in METHODS.items():
        assert method in text
        declared = {d["name"]: d for d in listing[method]["options"]}
        for opt in options_for(method):
            if not opt.user_input:
                continue
            if opt.cli:
                assert opt.flag in text
            assert declared[opt.name]["default"] == (list(opt.default) if isinstance(opt.default, tuple)
                                                    else opt.default)
            low, high = opt.bounds(info)
            assert (declared[opt.name].get("low"), declared[opt.name].get("high")) == (low, high)
            assert opt.name in MergeRequest.__dataclass_fields__


def test_an_option_for_another_method_is_refused_or_ignored_as_declared():
    for method, info in METHODS.items():
        for opt in OPTIONS.values():
            sample = _sample(opt, info)
            if opt.applies_to(info) or sample is None or not opt.user_input:
                continue
            settings = {"method": method, opt.name: sample}
            if opt.inapplicable == "refuse":
                with pytest.raises(RebasinError) as e:
                    _merge_options(settings).validate()
                assert getattr(e.value, "field", opt.name) == opt.name
            elif opt.inapplicable == "ignore":  # a recipe default for another method's parameter is no error
                _merge_options({"method": method, opt.name: opt.high if opt.high is not None else sample}).validate()


def test_one_limit_per_option_everywhere():
    """The interfaces share the table's bounds: the largest value the core takes is taken by the CLI, the recipe
    and the API, and one past it is refused by all three."""
    for opt in OPTIONS.values():
        if opt.kind is not int or opt.high is None or not opt.user_input or opt.name == "seed":
            continue
        method = next(m for m, info in METHODS.items() if opt.applies_to(info))
        for value, ok in ((opt.high, True), (opt.high + 1, False)):
            settings = {"method": method, opt.name: value}
            body = json.dumps(settings)
            if ok:
                MergeOptions(**settings).validate()
                MergeRequest.from_dict(json.loads(body))
                parse_recipe(f'[models]\na = "a.safetensors"\nb = "b.safetensors"\nc = "c.safetensors"\n'
                                        f'[[step]]\nmethod = "{method}"\na = "a"\nb = "b"\nc = "c"\n'
                                        f"{opt.name} = {value}\n")
            else:
                with pytest.raises(RebasinError, match=opt.name):
                    MergeOptions(**settings).validate()
                with pytest.raises(RebasinError, match=opt.name):
                    MergeRequest.from_dict(json.loads(body))
