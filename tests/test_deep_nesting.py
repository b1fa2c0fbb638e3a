"""Deeply nested, huge-numbered or oversized TOML and JSON from outside: one line, never a traceback.

Recipes (the CLI and the tab's recipe builder), `recipe --from` reading a checkpoint's metadata, an input's merge
history carried into a new merge, and request bodies of the HTTP API all parse through `lib_rebasin.io.parsing`; what
they return nests at most MAX_DEPTH levels, so nothing that walks or prints it later can recurse too deep.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path

import pytest
from model_cache import cached_state_dict
from test_bad_inputs import STEP, assert_refused, cli, listing

from lib_rebasin.io.checkpoint import open_checkpoint
from lib_rebasin.io.parsing import MAX_DEPTH

DEEP = 100_000  # far past Python's recursion limit
NEAR = 900      # parseable by json / tomllib, too deep to print or re-encode safely


@pytest.fixture(scope="module")
def models(tiny_models: dict[str, Path]) -> dict[str, Path]:
    """Tiny models in place of the mini ones: what is tested is metadata and recipe parsing, not the spec."""
    return tiny_models


def _limit_memory() -> None:
    """A CLI that tried to parse a 100,000-part dotted key would need tens of GB (tomllib is quadratic in it):
    cap the child at 2 GiB so that such a regression fails fast instead of taking the machine down."""
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def _depth(value: object) -> int:
    stack, worst = [(value, 1)], 0
    while stack:
        item, d = stack.pop()
        worst = max(worst, d)
        kids = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack += [(k, d + 1) for k in kids if isinstance(k, (dict, list))]
    return worst


RECIPES = {
    "nested_arrays": STEP + "alpha = " + "[" * DEEP + "]" * DEEP + "\n",
    "nested_inline_tables": STEP + "alpha = " + "{ b = " * 5_000 + "1" + " }" * 5_000 + "\n",
    "dotted_key_parseable": "[recipe]\nbake_vae" + ".a" * 2_000 + " = 1\n" + STEP,
    "dotted_key_huge": "[recipe]\nbake_vae" + ".a" * DEEP + " = 1\n" + STEP,
    "header_and_key_together": "[recipe" + ".a" * 40 + "]\nb" + ".a" * 40 + " = 1\n" + STEP,
    "integer_of_5000_digits": STEP + "seed = " + "1" * 5_000 + "\n",
    "integer_beyond_float": STEP + "alpha = 1" + "0" * 400 + "\n",
    "block_weight_beyond_float": STEP + 'method = "weighted_sum"\nblocks = [' + ", ".join(["1" + "0" * 400] * 26)
                                 + "]\n",
    "oversized": STEP + "# " + "x" * 300_000 + "\n",
}
WORDS = {"integer_of_5000_digits": "too long", "integer_beyond_float": "alpha", "block_weight_beyond_float": "blocks value 1",
         "oversized": "characters", "header_and_key_together": "nested more than"}


@pytest.mark.parametrize("case", sorted(RECIPES))
def test_a_recipe_that_nests_too_deep_is_one_line(tmp_path: Path, case: str) -> None:
    models, out = tmp_path / "models", tmp_path / "out"
    models.mkdir()
    out.mkdir()
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPES[case])
    before = listing(out)
    r = cli("recipe", recipe, "-o", out / "m.safetensors", "--models-dir", models, "-q", cwd=out,
            preexec=_limit_memory, timeout=120)
    line = assert_refused(r, out, before, "r.toml", WORDS.get(case, f"nested more than {MAX_DEPTH}"))
    assert len(line) < 300


# In-process, without the CLI's memory cap: the 100,000-part dotted key is the CLI test's alone.
@pytest.mark.parametrize("case", sorted(set(RECIPES) - {"dotted_key_huge"}))
def test_the_tabs_recipe_builder_gives_the_same_one_line_errors(case: str) -> None:
    from lib_rebasin.errors import RebasinError
    from lib_rebasin.ui import recipe_builder as rb

    with pytest.raises(RebasinError) as e:
        rb.load(RECIPES[case], "builder")
    assert "\n" not in str(e.value) and str(e.value).startswith("builder")


def test_a_recipe_file_that_never_ends_is_not_read_whole(tmp_path: Path) -> None:
    """A device or a huge file named as the recipe: only the first characters past the limit are read."""
    out = tmp_path / "out"
    out.mkdir()
    before = listing(out)
    r = cli("recipe", "/dev/zero", "-o", out / "m.safetensors", "--models-dir", tmp_path, "-q", cwd=out,
            preexec=_limit_memory, timeout=120)
    assert_refused(r, out, before, "zero")


def _with_metadata(src: Path, dest: Path, metadata: dict[str, str]) -> Path:
    with open_checkpoint(src) as ck:
        tensors = {k: ck.get(k).clone() for k in ck.keys()}
    return cached_state_dict(dest, tensors, metadata)  # an input: made once per model cache


@pytest.mark.parametrize("depth", [NEAR, DEEP])
def test_recipe_from_a_checkpoint_with_deeply_nested_metadata(models: dict, tmp_path: Path, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    ckpt = _with_metadata(models["a"], tmp_path / "deep.safetensors",
                          {"lib_rebasin": '{"recipe_toml": {"x": ' + nested + "}}"})
    out = tmp_path / "out"
    out.mkdir()
    before = listing(out)
    r = cli("recipe", "--from", ckpt, "-o", out / "r.toml", cwd=out)
    assert_refused(r, out, before, "deep.safetensors", "'lib_rebasin' metadata", f"nested more than {MAX_DEPTH}")


@pytest.mark.parametrize("depth", [NEAR, DEEP])
def test_an_inputs_deeply_nested_merge_history_is_left_out_not_a_crash(models: dict, tmp_path: Path,
                                                                        depth: int) -> None:
    """Another tool's history in an input (`sd_merge_recipe`, `sd_merge_models`) is optional: a damaged or absurdly
    deep one is not carried into the output, and the merge succeeds."""
    nested = "[" * depth + "]" * depth
    b = _with_metadata(models["finetune"], tmp_path / "b.safetensors",
                       {"sd_merge_recipe": nested, "sd_merge_models": '{"x": ' + nested + "}"})
    out = tmp_path / "m.safetensors"
    r = cli("merge", models["a"], b, "-o", out, "--method", "weighted_sum", "-q", cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    with open_checkpoint(out) as ck:
        history = json.loads(ck.metadata["sd_merge_models"])
    assert "x" not in history and _depth(history) <= MAX_DEPTH
    assert all(entry["sd_merge_recipe"] is None for entry in history.values())


def test_parsed_values_are_never_deeper_than_the_limit() -> None:
    """The limit holds exactly: MAX_DEPTH levels are read, one more is refused, for TOML and JSON alike."""
    from lib_rebasin.io.parsing import parse_json, parse_toml

    def fail(why: str) -> ValueError:
        return ValueError(why)

    assert _depth(parse_json("[" * MAX_DEPTH + "]" * MAX_DEPTH, fail)) == MAX_DEPTH
    assert _depth(parse_toml("a = " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1), fail)) == MAX_DEPTH
    with pytest.raises(ValueError, match="nested more than"):
        parse_json("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), fail)
    with pytest.raises(ValueError, match="nested more than"):
        parse_toml("a = " + "[" * MAX_DEPTH + "]" * MAX_DEPTH, fail)
    # Strings and comments hold brackets and dots that nest nothing.
    text = 'a = "' + "[." * 500 + '"\nb = \'\'\'' + "{." * 500 + "''''\nc = \"\"\"\\\"\"\"\" # " + "[" * 500 + "\n"
    assert parse_toml(text, fail)["b"].endswith("'")
