"""What the tab and the HTTP API ask for: `MergeRequest` (a merge's options, from the option table, plus the
request's own fields: the models by their titles, the output name, block weights as text, the VAE to bake in) and
`RecipeRequest`, read strictly from JSON; and the method listing the API serves.

Every option field, its JSON type and its checks come from `options.OPTIONS`: a new option or method parameter
reaches the API with no edit here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import FieldError, RebasinError
from ..merge.block_weights import BlockWeights, check_values, parse_blocks
from ..messages import shown
from ..methods import METHODS, MethodInfo
from ..option import Option
from ..options import OPTIONS, MergeOptions, options_for
from ..parts import PARTS

MAX_TEXT = 512  # characters in a name field

# The request's own fields (not merge options): name, type, default. `blocks` is text here (a preset name or the
# values), parsed with alpha into the options' 26 numbers.
REQUEST_FIELDS: tuple[tuple[str, type, Any], ...] = (
    ("model_a", str, ""), ("model_b", str, ""), ("model_c", str, None))
REQUEST_TAIL: tuple[tuple[str, type, Any], ...] = (
    ("output_name", str, ""), ("overwrite", bool, False),
    ("blocks", str, ""),      # a preset name or 26 (25) comma-separated values; "" = alpha everywhere
    ("bake_vae", str, ""))    # a VAE from the host's VAE list, or a checkpoint, whose VAE goes into the output
# The options a request sets (block weights come as text, their preset name is derived).
REQUEST_OPTIONS = [o for o in OPTIONS.values() if o.user_input and o.name != "blocks"]



@contextmanager
def field_of(name: str) -> Iterator[None]:
    """Any refusal raised while checking the value of field `name` names that field (the API's 422)."""
    try:
        yield
    except FieldError:
        raise
    except RebasinError as e:
        raise FieldError(name, str(e)) from None


def _number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise FieldError(name, f"Field '{name}' must be a number, got {shown(v, 60)}.")
    try:
        f = float(v)
    except OverflowError:  # a huge JSON integer
        f = math.inf
    if not math.isfinite(f):
        raise FieldError(name, f"Field '{name}' must be a finite number, got {shown(v, 60)}.")
    return f


def _integer(name: str, v: Any) -> int:
    f = _number(name, v)
    if f != int(f):
        raise FieldError(name, f"Field '{name}' must be a whole number, got {shown(v, 60)}.")
    return int(f)


def _text(name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise FieldError(name, f"Field '{name}' must be a string, got {shown(v, 60)}.")
    if len(v) > MAX_TEXT:
        raise FieldError(name, f"Field '{name}' is too long ({len(v)} characters; at most {MAX_TEXT}).")
    return v


def _choices(opt: Option, v: Any) -> tuple[str, ...]:
    """Several of an option's choices: a JSON list of strings, or one comma-separated string."""
    if isinstance(v, str):
        v = [p.strip() for p in v.split(",") if p.strip()]
    if not isinstance(v, list) or not all(isinstance(p, str) for p in v) or len(v) > len(opt.choices):
        raise FieldError(opt.name, f"Field '{opt.name}' must be a list of {', '.join(opt.choices)}; "
                                   f"got {shown(v, 60)}.")
    return tuple(v)


def _json_value(name: str, kind: type, v: Any, opt: Option | None = None) -> Any:
    """One field's JSON value as `kind`: numbers are JSON numbers (no strings, no booleans) and finite."""
    if kind is float:
        return _number(name, v)
    if kind is int:
        return _integer(name, v)
    if kind is bool:
        if not isinstance(v, bool):
            raise FieldError(name, f"Field '{name}' must be true or false, got {shown(v, 60)}.")
        return v
    if kind is tuple and opt is not None:
        return _choices(opt, v)
    return _text(name, v)


class _RequestBehaviour:
    """MergeRequest's behaviour; its fields are made from the option table below."""

    if TYPE_CHECKING:  # fields made at import time; type checkers see them as Any
        def __init__(self, *args: Any, **kwargs: Any) -> None: ...
        def __getattr__(self, name: str) -> Any: ...
        def __setattr__(self, name: str, value: Any) -> None: ...

    @classmethod
    def from_dict(cls, d: Any) -> MergeRequest:
        """Build from JSON (the API): unknown fields, wrong types and values the options refuse are a FieldError
        naming the field."""
        if not isinstance(d, dict):
            raise FieldError("body", "The request body must be a JSON object.")
        known = set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
        unknown = sorted(set(d) - known, key=str)
        if unknown:
            names = ", ".join(shown(k, 40) for k in unknown[:5])
            raise FieldError(str(unknown[0])[:40], f"Unknown field(s) {names}; allowed: {', '.join(sorted(known))}.")
        kinds: dict[str, tuple[type, Option | None]] = {name: (kind, None) for name, kind, _ in
                                                        (*REQUEST_FIELDS, *REQUEST_TAIL)}
        kinds.update({o.name: (o.kind, o) for o in REQUEST_OPTIONS})
        kw: dict[str, Any] = {}
        for k, v in d.items():
            kind, opt = kinds[k]
            if v is None and k in ("model_c", "blocks", "bake_vae"):  # "not set"
                kw[k] = None if k == "model_c" else ""
            elif v is None and opt is not None and opt.optional:
                kw[k] = None
            elif k == "blocks" and isinstance(v, list):
                if len(v) > 26:
                    raise FieldError(k, f"Field 'blocks' takes 26 (or 25) values, 20 for SDXL, got {len(v)}.")
                kw[k] = ",".join(repr(_number(k, x)) for x in v)
            else:
                kw[k] = _json_value(k, kind, v, opt)
        req = MergeRequest(**kw)
        req.options()  # every option's value and combination, as the core checks them
        return req

    def method_info(self) -> MethodInfo | None:
        return METHODS.get(self.method) if isinstance(self.method, str) else None

    def block_weights(self) -> BlockWeights | None:
        """The parsed block weights (None without), in range for this method, else a FieldError on `blocks` (a
        preset name that does not exist, a wrong count, NaN, a negative weight for a weighted sum)."""
        if not self.blocks or not self.blocks.strip():
            return None
        bw = parse_blocks(self.blocks, float(self.alpha))
        info = self.method_info()
        if info is not None:
            check_values(bw.values, info.alpha_bounded)
        return bw

    def options(self) -> MergeOptions:
        """The request's MergeOptions, checked (a FieldError naming the field); parts in their canonical order."""
        values = {o.name: getattr(self, o.name) for o in REQUEST_OPTIONS}
        if isinstance(values["parts"], (tuple, list)) and not set(values["parts"]) - set(PARTS):
            values["parts"] = tuple(p for p in PARTS if p in set(values["parts"]))
        options = MergeOptions(**values)
        options.validate()
        bw = self.block_weights()
        if bw is not None:
            options = options.with_blocks(bw.values, bw.preset)
            options.validate()
        return options


def _request_class() -> type:
    fields = [(name, kind, default) for name, kind, default in REQUEST_FIELDS]
    fields += [(o.name, o.kind, o.default) for o in REQUEST_OPTIONS]
    fields += [(name, kind, default) for name, kind, default in REQUEST_TAIL]
    cls = type("MergeRequest", (_RequestBehaviour,), {
        "__module__": __name__, "__annotations__": {name: kind for name, kind, _ in fields},
        "__doc__": "One merge as the tab or the API asks for it: the models by their titles, every option of the "
                   "table (options.OPTIONS) and the request's own fields.",
        **{name: field(default=default) for name, _, default in fields}})
    return dataclass(cls)


if TYPE_CHECKING:
    class MergeRequest(_RequestBehaviour):
        pass
else:
    MergeRequest = _request_class()


@dataclass
class RecipeRequest:
    """A whole recipe (its TOML text) to run into `output_name` in the checkpoint folder."""

    text: str = ""
    output_name: str = ""
    overwrite: bool = False


def method_table() -> dict[str, MethodInfo]:
    """The methods by name (methods.METHODS)."""
    return dict(METHODS)


_FLAGS = ("needs_c", "uses_alpha", "alpha_bounded", "iterates", "aligns", "alignable", "block_weights",
          "repairable", "random")


def method_listing() -> list[dict[str, Any]]:
    """Every method with its flags and the declarations of the options that apply to it (bounds for this
    method), for API clients: what `GET /rebasin/v1/methods` answers."""
    return [{"name": name, "label": info.label, "help": info.help, "source": info.source,
             **{flag: getattr(info, flag) for flag in _FLAGS},
             "options": [o.declaration(info) for o in options_for(name) if o.user_input]}
            for name, info in METHODS.items()]
