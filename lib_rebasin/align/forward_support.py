"""Which pairs the host-free forward pass can run: activation matching and REPAIR both need it, and it exists for
SD 1.x only."""

from __future__ import annotations

from ..errors import RebasinError
from ..io.model_input import ModelConfig, architecture_of
from ..sd1 import forward
from ..sd1.config import SD1Config


def check_forward_supported(a: ModelConfig, b: ModelConfig, what: str, advice: str) -> None:
    """Refuse, in one line, a pair the SD 1.x forward pass cannot run (never approximated on another architecture)."""
    if isinstance(a, SD1Config) and isinstance(b, SD1Config):
        forward.check_plain_unets(a, b, what, advice)
        return
    label, other = ("A", a) if not isinstance(a, SD1Config) else ("B", b)
    raise RebasinError(f"{what} runs the SD 1.x forward pass and is not available for {architecture_of(other)} "
                       f"(model {label}). {advice}")
