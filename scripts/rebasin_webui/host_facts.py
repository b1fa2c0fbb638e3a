"""What the adapter asks of the host in many places: a setting as the config holds it, and whether it is Forge."""

from modules import sd_models, shared

try:
    from modules import progress as webui_progress
except ImportError:  # pragma: no cover - very old or exotic hosts
    webui_progress = None


def opt(key, default):
    """A setting from config.json's data (opts.data.get, so it also works with --nowebui, where no UI adds it)."""
    return shared.opts.data.get(key, default)


def is_forge():
    return hasattr(sd_models, "forge_model_reload")
