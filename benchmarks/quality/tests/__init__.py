"""The merge-quality benchmark's own tests, collected by the project's `python -m pytest` (pyproject's testpaths)."""
