"""User-facing errors.

Every failure a user can cause (bad file, wrong architecture, existing output, ...) is a `RebasinError` whose
message is one actionable sentence. The CLI prints it on one line and exits non-zero; the WebUI tab shows it.
Anything else escaping the core is a bug.
"""

from __future__ import annotations


class RebasinError(Exception):
    """A problem with the user's input or environment, explained in plain words."""


class FieldError(RebasinError):
    """A refusal of one named value of a request or of the merge options (wrong type, out of range, unknown
    name): `field` names it, and the HTTP API answers 422 with that field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


class CheckpointReadError(RebasinError):
    """A checkpoint file could not be read (missing, truncated, not a checkpoint, unsafe pickle)."""


class InputChangedError(CheckpointReadError):
    """An input file was truncated or modified while a merge was reading it (its bytes are no longer what was
    opened). `path` is the file; the merge names the model slot in its message."""

    def __init__(self, path: object, message: str | None = None) -> None:
        self.path = path
        name = getattr(path, "name", path)
        super().__init__(message or f"{name} changed while it was being read; nothing was written.")


class UnsupportedModelError(RebasinError):
    """The checkpoint is readable but is not a Stable Diffusion 1.x model."""


class IncompatibleModelsError(RebasinError):
    """Two checkpoints cannot be merged with each other (different shapes or variants)."""


class OutputError(RebasinError):
    """The output file cannot be written (exists, folder missing or not writable)."""


class Cancelled(RebasinError):
    """The user stopped the work; nothing was written."""

    def __init__(self, message: str = "Cancelled by the user; no file was written.") -> None:
        super().__init__(message)


class NonFiniteWeightsError(RebasinError):
    """An input holds NaN/Inf weights (refused unless allowed), or a merge would produce them."""


class ArgumentError(RebasinError):
    """A public function was called with an argument of the wrong type or value (a None where a file is needed,
    a string where options are): names the function and the argument."""
