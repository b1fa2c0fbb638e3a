"""Stand-in for modules_forge/main_entry.py: the top-left checkpoint dropdown's handler and the lazy loading
parameters it refreshes (the model itself loads at the next generation)."""

from modules import record, sd_models, shared


def refresh_model_loading_parameters():
    info = sd_models.select_checkpoint()
    sd_models.model_data.forge_loading_parameters = dict(checkpoint_info=info)
    record("main_entry.refresh_model_loading_parameters", info.title if info else None)


def checkpoint_change(ckpt_name, save=True, refresh=True):
    """Like Forge's: no change when the name resolves to the current checkpoint; else store the name as given,
    save config.json and refresh the loading parameters. Returns True if the checkpoint changed."""
    record("main_entry.checkpoint_change", ckpt_name)
    new = sd_models.get_closet_checkpoint_match(ckpt_name)
    current = sd_models.get_closet_checkpoint_match(shared.opts.data.get("sd_model_checkpoint", ""))
    if new == current:
        return False
    shared.opts.set("sd_model_checkpoint", ckpt_name)
    if save:
        shared.opts.save(shared.config_filename)
    if refresh:
        refresh_model_loading_parameters()
    return True
