"""Parsing TOML and JSON that come from outside (recipes, checkpoint headers and metadata, request bodies).

Every parse goes through here so that no text, however it is built, ends in a traceback: a syntax error, a
number too long to convert, text nested deeper than any of our formats, or a parse that runs out of memory is
one sentence, worded by the caller (`fail(reason)` returns the exception to raise). What is returned is nested at
most MAX_DEPTH levels, so code that walks or prints it recursively never hits Python's recursion limit.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (A1111's own Python)
    import tomli as tomllib

# Our formats nest a few levels (a recipe's [[step]] table holding a blocks list; a safetensors header's tensor
# entry holding its shape). Far below Python's recursion limit, so a checked value can be walked recursively.
MAX_DEPTH = 64
# The longest recipe text read: a thousand steps with 26 block weights each stay well below it, and it bounds
# the time tomllib can spend on one text.
MAX_TOML_CHARS = 256 * 1024

TOO_DEEP = f"nested more than {MAX_DEPTH} levels deep"
_TOML_NESTS = " (brackets, braces or dotted keys)"
_JSON_NESTS = " (brackets or braces)"

Fail = Callable[[str], Exception]


def parse_toml(text: str, fail: Fail, max_chars: int = MAX_TOML_CHARS) -> dict[str, Any]:
    """The TOML document `text`, or `fail(reason)` raised; the reason is a phrase such as "nested more than 64
    levels deep" or tomllib's own message with its line and column."""
    if len(text) > max_chars:
        raise fail(f"longer than the {max_chars:,} characters a recipe may have")
    # tomllib recurses once per bracket and spends time quadratic in a dotted key's length: bound both first.
    if _toml_nesting(text) > MAX_DEPTH:
        raise fail(TOO_DEEP + _TOML_NESTS)
    try:
        value = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise fail(str(e)) from None
    except (RecursionError, MemoryError, ValueError) as e:  # ValueError: an integer of over 4,300 digits
        raise fail(_reason(e, _TOML_NESTS)) from None
    _check_depth(value, fail, _TOML_NESTS)
    return value


def parse_json(raw: str | bytes, fail: Fail, **options: Any) -> Any:
    """The JSON value `raw` (UTF-8 if bytes, as RFC 8259 and safetensors require), or `fail(reason)` raised.
    `options` go to `json.loads`; an exception its hooks raise on purpose passes through."""
    try:
        value = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw, **options)
    except UnicodeDecodeError:
        raise fail("not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise fail(f"not valid JSON: {e.msg} at byte {e.pos}") from None
    except (RecursionError, MemoryError, ValueError) as e:
        raise fail(_reason(e, _JSON_NESTS)) from None
    _check_depth(value, fail, _JSON_NESTS)
    return value


def json_or_none(raw: str | None) -> Any:
    """An optional JSON metadata entry (another tool's history, say): its value, or None when it is missing or
    cannot be parsed."""
    if not raw:
        return None
    try:
        return parse_json(raw, ValueError)
    except ValueError:
        return None


def _reason(e: BaseException, nests: str) -> str:
    if isinstance(e, RecursionError):
        return TOO_DEEP + nests
    if isinstance(e, MemoryError):
        return "too large to parse in the memory available"
    return f"not readable: a number in it is too long ({str(e).split(';')[0]})"


def _check_depth(value: Any, fail: Fail, nests: str) -> None:
    """Refuse a parsed value nested deeper than MAX_DEPTH (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > MAX_DEPTH:
                    raise fail(TOO_DEEP + nests)
                stack.append((child, depth + 1))


def _toml_nesting(text: str) -> int:
    """An upper bound of the nesting one TOML construct can add: the brackets open at a point plus the dots of the
    dotted key or header there (strings and comments skipped). A key under a header can add the header's depth to
    its own; `_check_depth` refuses that after parsing, when both are already bounded."""
    worst = depth = dots = 0
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == '"' or ch == "'":
            i = _string_end(text, i)
            continue
        if ch == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        if ch in "[{":
            depth += 1
            dots = 0
        elif ch in "]}":
            depth = max(0, depth - 1)
            dots = 0
        elif ch in "\n,=":
            dots = 0
        elif ch == ".":
            dots += 1
        worst = max(worst, depth + dots)
        i += 1
    return worst


def _string_end(text: str, i: int) -> int:
    """The index after the TOML string starting at `i` (basic or literal, single- or multi-line). An unterminated
    single-line string ends at its line's end, where tomllib refuses it."""
    quote = text[i]
    triple = text.startswith(quote * 3, i)
    j = i + (3 if triple else 1)
    n = len(text)
    while j < n:
        ch = text[j]
        if ch == "\\" and quote == '"':
            j += 2
            continue
        if not triple and ch == "\n":
            return j
        if triple and text.startswith(quote * 3, j):
            j += 3
            # Up to two more quotes right before the closing three belong to the string.
            for _ in range(2):
                if j < n and text[j] == quote:
                    j += 1
            return j
        if not triple and ch == quote:
            return j + 1
        j += 1
    return n
