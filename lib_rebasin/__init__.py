"""lib_rebasin: function-preserving Git Re-Basin merging for Stable Diffusion 1.x checkpoints.

The core is host-free (torch, safetensors, scipy). Entry points: `lib_rebasin.merge.run.merge_checkpoints`
(one merge with progress and cancel), `python -m lib_rebasin` (CLI).
"""

__version__ = "0.1.0"
