"""Command line: `python -m lib_rebasin merge | add-difference | inspect | demo | ui`.

Errors are one line on stderr and exit status 2, and never leave an output file behind.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from .device_budget import NOTICE_STAGE
from .errors import Cancelled, RebasinError
from .merge.block_weights import parse_blocks
from .merge.run import MergeResult, merge_checkpoints
from .methods import METHODS
from .option import Option
from .options import OPTIONS, MergeOptions, users_of
from .progress import ProgressEvent
from .signals import commit_done, commit_reached, interrupts_until_commit, late_signals


class ProgressBar:
    """A one-line progress bar on a terminal; occasional plain lines when piped (logs stay readable)."""

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        # None: the sys.stderr of the moment, not of import time (a redirected stderr is honoured).
        self.stream, self.width = stream if stream is not None else sys.stderr, width
        self.tty = self.stream.isatty()
        self.last_print = 0.0
        self.last_stage = ""

    def __call__(self, ev: ProgressEvent) -> None:
        now = time.monotonic()
        if ev.stage == NOTICE_STAGE:  # a notice (device_budget.py's CPU fallback) gets a line of its own, always
            self.stream.write(f"{chr(10) if self.tty else ''}note: {ev.message}\n")
            self.stream.flush()
            return
        if self.tty:
            if now - self.last_print < 0.1 and ev.fraction < 1:
                return
            filled = int(self.width * ev.fraction)
            eta = f" ETA {ev.eta_s:.0f}s" if ev.eta_s is not None and ev.fraction < 1 else ""
            line = f"\r[{'#' * filled}{'.' * (self.width - filled)}] {ev.fraction * 100:5.1f}% {ev.message}{eta}"
            self.stream.write(line[:160].ljust(160))
            if ev.fraction >= 1:
                self.stream.write("\n")
        elif ev.stage != self.last_stage or now - self.last_print > 10:
            self.stream.write(f"{ev.fraction * 100:5.1f}% {ev.message}\n")
        else:
            return
        self.stream.flush()
        self.last_print = now
        self.last_stage = ev.stage

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _options(args: argparse.Namespace, method: str) -> MergeOptions:
    """MergeOptions from the flags `_add_options` made, one per option of the table."""
    values: dict[str, Any] = {"method": method}
    for opt in _cli_options():
        value = getattr(args, opt.name, None)
        if opt.kind is tuple and isinstance(value, str):  # --parts unet,te
            value = tuple(p.strip() for p in value.split(",") if p.strip())
        if opt.sweep and isinstance(value, str):  # --alpha 0.25,0.5: the first here, all in _swept
            value = _swept(args, opt)[0]
        if value is not None and opt.name != "blocks":
            values[opt.name] = value
    options = MergeOptions(**values)
    if args.blocks is not None:
        bw = parse_blocks(args.blocks, options.alpha)
        options = options.with_blocks(bw.values, bw.preset)
    return options


def _swept(args: argparse.Namespace, opt: Option) -> list[Any]:
    """The values of a flag that takes a comma-separated list (a sweep, merge/sweep.py)."""
    from .merge.sweep import parse_alphas

    value = getattr(args, opt.name)
    return parse_alphas(value) if isinstance(value, str) else [value]


def _print_result(result: MergeResult) -> None:
    print(f"Wrote {result.output}")
    for line in result.diagnostics.summary_lines():
        print(f"  {line}")
    _note_late_signals(result.output)


def _note_late_signals(output: Path) -> None:
    """A stop request that came once the output was committed changed nothing: say so, next to the file."""
    late = late_signals()
    if late:
        print(f"note: {' and '.join(late)} came while {output.name} was being saved, too late to stop it; the "
              "merge is complete.", file=sys.stderr)


def _run_merge(args: argparse.Namespace, method: str, c: str | None = None) -> int:
    from .merge.sweep import is_sweep

    alphas = _swept(args, OPTIONS["alpha"])
    if is_sweep(alphas, args.output):
        return _run_sweep(args, method, alphas, c)
    bar = None if args.quiet else ProgressBar()
    try:
        result = merge_checkpoints(args.model_a, args.model_b, args.output, _options(args, method), c=c,
                                   overwrite=args.overwrite, progress=bar, bake_vae=args.bake_vae,
                                   on_commit=commit_reached)
    except KeyboardInterrupt:
        raise Cancelled() from None
    finally:
        if bar is not None and bar.tty:
            bar.finish()
    _print_result(result)
    return 0


def _run_sweep(args: argparse.Namespace, method: str, alphas: list[Any], c: str | None) -> int:
    """--alpha 0.25,0.5,0.75 -o "AB_{alpha}.safetensors": one file per value, B matched onto A once."""
    from .merge.sweep import sweep_checkpoints

    bar = None if args.quiet else ProgressBar()

    def written(result: MergeResult) -> None:
        commit_done()  # the next candidate can be stopped again; a signal during this commit stops it first
        if bar is not None and bar.tty:
            bar.finish()
        print(f"Wrote {result.output}")
        for line in result.diagnostics.summary_lines():
            print(f"  {line}")

    try:
        results = sweep_checkpoints(args.model_a, args.model_b, args.output, _options(args, method), alphas, c=c,
                                    overwrite=args.overwrite, progress=bar, cancel=lambda: bool(late_signals()),
                                    bake_vae=args.bake_vae, on_commit=commit_reached, on_written=written)
    finally:
        if bar is not None and bar.tty:
            bar.finish()
    _note_late_signals(results[-1].output)
    return 0


def _cli_options() -> list[Option]:
    return [o for o in OPTIONS.values() if o.cli and o.user_input]


def _option_help(opt: Option, default: Any) -> str:
    """The option's help, prefixed with the methods it applies to (where that is not all) and its default."""
    users = users_of(opt)
    text = opt.help
    if opt.name == "method":
        text = "; ".join(f"{k}: {v.help}" for k, v in METHODS.items())
    elif len(users) <= len(METHODS) // 2:
        text = f"{', '.join(users)}: {text}"
    elif len(users) < len(METHODS):
        text += f" (not for {', '.join(m for m in METHODS if m not in users)})"
    if default is not None and not isinstance(default, bool):
        shown = ",".join(default) if isinstance(default, tuple) else f"{default:g}" if isinstance(default, float) \
            else default
        text += f" (default {shown})"
    return text.replace("%", "%%")


def _add_options(p: argparse.ArgumentParser, defaults: dict[str, Any], fixed: tuple[str, ...] = ()) -> None:
    """One flag per option of the table (--name-with-dashes), except those the subcommand `fixed`."""
    p.add_argument("-o", "--output", required=True, help="output .safetensors file")
    for opt in _cli_options():
        if opt.name in fixed:
            continue
        default = defaults.get(opt.name, opt.default)
        help_text = _option_help(opt, default)
        if opt.kind is bool:
            p.add_argument(opt.flag, dest=opt.name, action="store_true", help=help_text)
        elif opt.sweep:  # one value, or a comma-separated list for a sweep (one output per value)
            p.add_argument(opt.flag, dest=opt.name, default=default, help=help_text + "; a comma-separated list "
                           "makes a sweep: one output per value, -o naming each with {" + opt.name + "}")
        elif opt.kind is tuple:  # several choices (--parts unet,te); block weights are text, parsed with alpha
            p.add_argument(opt.flag, dest=opt.name, default=None if default is None else ",".join(default),
                           help=help_text)
        else:
            p.add_argument(opt.flag, dest=opt.name, type=opt.kind, default=default,
                           choices=list(opt.choices) or None, help=help_text)
    p.add_argument("--bake-vae", metavar="FILE", help="put this VAE (a VAE file, or a checkpoint's VAE) into the "
                   "output instead of merging the VAE, as the WebUI's merger does")
    p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lib_rebasin",
                                 description="Function-preserving Git Re-Basin merges of SD 1.x checkpoints.")
    sub = ap.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge two checkpoints (re-basin by default; methods that need a base take C)")
    m.add_argument("model_a")
    m.add_argument("model_b")
    m.add_argument("model_c", nargs="?", help="the base B (and A) were tuned from, for methods that need C")
    _add_options(m, {})

    d = sub.add_parser("add-difference", help="A + alpha * (B - C)")
    d.add_argument("model_a")
    d.add_argument("model_b")
    d.add_argument("model_c")
    _add_options(d, {"alpha": 0.2}, fixed=("method",))

    i = sub.add_parser("inspect", help="architecture, dtype, keys and size of a checkpoint")
    i.add_argument("file")

    demo = sub.add_parser("demo", help="make two small SD-1.5-layout checkpoints here and re-basin merge them")
    demo.add_argument("--dir", default="demo", help="folder for the demo files (default ./demo)")
    demo.add_argument("--dunkmash-models", action="store_true",
                      help="only write small stand-ins for the models named in examples/dunkmash.toml")

    r = sub.add_parser("recipe", help="run a recipe (a chain of merges), or extract one from a checkpoint")
    r.add_argument("file", nargs="?", help="recipe .toml to run")
    r.add_argument("-o", "--output", help="output .safetensors (run) or .toml (with --from; default: print)")
    r.add_argument("--from", dest="from_checkpoint", help="print the recipe stored in this checkpoint's metadata")
    r.add_argument("--models-dir", help="folder the recipe's model names refer to (default: the recipe's folder)")
    r.add_argument("--vae-dir", help="folder where the recipe's bake_vae model is looked for first (e.g. the "
                   "WebUI's models/VAE)")
    r.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    ui = sub.add_parser("ui", help="the Re-Basin tab as a standalone app")
    ui.add_argument("rest", nargs=argparse.REMAINDER)
    return ap


def _recipe_command(args: argparse.Namespace) -> int:
    from .recipe.from_output import recipe_from_checkpoint
    from .recipe.parse import load_recipe
    from .recipe.run import run_recipe

    if args.from_checkpoint:
        text = recipe_from_checkpoint(args.from_checkpoint)
        if args.output:
            try:
                Path(args.output).write_text(text, encoding="utf-8")
            except (OSError, ValueError) as e:
                raise RebasinError(f"Cannot write {args.output}: {getattr(e, 'strerror', None) or e}.") from None
            print(f"Wrote {args.output}")
        else:
            print(text, end="")
        return 0
    if not args.file or not args.output:
        raise RebasinError("usage: recipe FILE.toml -o OUT.safetensors [--models-dir DIR] [--vae-dir DIR], "
                           "or recipe --from CKPT")
    recipe = load_recipe(args.file)
    models_dir = Path(args.models_dir) if args.models_dir else Path(args.file).resolve().parent
    bar = None if args.quiet else ProgressBar()

    def written(result: MergeResult) -> None:  # a sweep's file (the last step's alpha is a list)
        commit_done()
        print(f"Wrote {result.output}")

    try:
        result = run_recipe(recipe, models_dir, args.output, overwrite=args.overwrite, progress=bar,
                            cancel=lambda: bool(late_signals()),
                            vae_dir=Path(args.vae_dir) if args.vae_dir else None, on_commit=commit_reached,
                            on_written=written)
    except KeyboardInterrupt:
        raise Cancelled() from None
    finally:
        if bar is not None and bar.tty:
            bar.finish()
    if not result.outputs:
        print(f"Wrote {result.output}")
    for line in result.summary_lines():
        print(f"  {line}")
    _note_late_signals(result.output)
    return 0


def _demo(folder: str) -> int:
    from .demo import run_demo

    return run_demo(Path(folder))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ui"]:
        from .ui.standalone import main as ui_main

        return ui_main(argv[1:])
    args = build_parser().parse_args(argv)
    restore = interrupts_until_commit()
    try:
        if args.command == "merge":
            if args.model_c is not None and not METHODS[args.method].needs_c:
                raise RebasinError(f"{METHODS[args.method].label} takes two models; a third (C) was given.")
            return _run_merge(args, args.method, c=args.model_c)
        if args.command == "add-difference":
            return _run_merge(args, "add_difference", c=args.model_c)
        if args.command == "inspect":
            from .io.describe import inspect_checkpoint

            info = inspect_checkpoint(args.file)
            print("\n".join(info.lines()))
            return 0 if info.supported else 2
        if args.command == "demo":
            if args.dunkmash_models:
                from .demo import make_dunkmash_standins

                make_dunkmash_standins(Path(args.dir))
                print(f"Wrote stand-ins for examples/dunkmash.toml into {args.dir}/")
                return 0
            return _demo(args.dir)
        if args.command == "recipe":
            return _recipe_command(args)
    except RebasinError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the environment (a full disk, a vanished folder), not a bug: one line as well
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM outside a merge (a merge turns it into Cancelled); never
        # after a commit (signals.py), so nothing was written
        print(f"error: {Cancelled()}", file=sys.stderr)
        return 2
    finally:
        restore()
    return 1
