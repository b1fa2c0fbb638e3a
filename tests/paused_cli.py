"""Run the real CLI (`python -m lib_rebasin ...`), holding it at a chosen point so a test can act on it there.

    python tests/paused_cli.py STAGE N [--named-temp] -- merge A B -o OUT ...

At the N-th progress report of STAGE (made whether or not a progress bar is shown) ("matching", "hashing", "writing") the process prints `PAUSED <pid>` on
stdout and waits for a line on stdin before it goes on. Two more STAGEs hold it around the output's commit:
"finalize" when the writer asks for the final metadata (every tensor written, the last cancel check not yet
made), "placed" right after the output got its final name (`place_output` returned). The process may be the
standalone app (`-- ui ...`): then a merge job's thread is held there. While it waits the test can signal it, or truncate,
rewrite or rename an input: the timing is fixed by the pause, not by guessed sleeps. Nothing else is changed:
the CLI's own main, signal handling, merge and writer run. `--named-temp` makes the writer use the named temp
file that filesystems without O_TMPFILE get.
"""

from __future__ import annotations

import sys


def main() -> int:
    stage, count = sys.argv[1], int(sys.argv[2])
    rest = sys.argv[3:]
    if rest and rest[0] == "--named-temp":
        try:
            from lib_rebasin.io import tempfiles

            tempfiles.USE_UNNAMED = False
        except ImportError:  # a version from before unnamed temp files: it always writes a named one
            pass
        rest = rest[1:]
    assert rest[0] == "--"
    from lib_rebasin import cli, progress
    from lib_rebasin.merge import run as merge
    from lib_rebasin.io import output_file

    seen = 0

    def arrive() -> None:
        nonlocal seen
        seen += 1
        if seen == count:
            import os

            print(f"PAUSED {os.getpid()}", flush=True)
            sys.stdin.readline()

    if stage == "placed":
        real_place = output_file.place_output

        def place(*args, **kwargs):  # type: ignore[no-untyped-def]
            real_place(*args, **kwargs)
            arrive()

        output_file.place_output = place  # type: ignore[assignment]
    elif stage == "finalize":
        real_write = merge.write_safetensors

        def write(*args, finalize_metadata=None, **kwargs):  # type: ignore[no-untyped-def]
            def finalize():  # type: ignore[no-untyped-def]
                arrive()
                return finalize_metadata()

            return real_write(*args, finalize_metadata=finalize if finalize_metadata else None, **kwargs)

        merge.write_safetensors = write  # type: ignore[assignment]
    else:
        real_call = progress.Reporter.__call__

        def call(self: progress.Reporter, ev_stage: str, local: float, message: str) -> None:
            if ev_stage == stage:
                arrive()
            real_call(self, ev_stage, local, message)

        progress.Reporter.__call__ = call  # type: ignore[method-assign]
    return cli.main(rest[1:])


if __name__ == "__main__":
    sys.exit(main())
