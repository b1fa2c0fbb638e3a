"""Benchmarks (issue 5): our merges against the public SD 1.5 re-basin mergers on identical synthetic inputs.

`python -m benchmarks.run --help` runs the harness; `python -m benchmarks.lap_compare --help` compares assignment
solvers. Nothing here is imported by `lib_rebasin` or the tests, and the public anchors are never copied in: sd-meh
is a pip package (benchmark-only), ogkalu2's code is imported from a checkout outside the repo.
"""
