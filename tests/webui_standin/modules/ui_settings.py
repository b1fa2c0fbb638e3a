"""Stand-in for the handlers behind the top-left checkpoint dropdown (modules/ui_settings.py, Forge's
modules_forge/main_entry.py) and behind the page's `selectCheckpoint(name)` (javascript/ui.js), which clicks the
hidden #change_checkpoint button."""

from . import record, sd_models, shared


def checkpoint_dropdown_changed(value):
    """The dropdown's change handler. A1111: run_settings_single (set the option, whose onchange loads the model;
    save config.json). Forge: main_entry.checkpoint_change."""
    record("ui_settings.checkpoint_dropdown_changed", value)
    if sd_models.FORGE:
        from modules_forge import main_entry

        main_entry.checkpoint_change(value)
        return
    if value is not None and shared.opts.set("sd_model_checkpoint", value):
        shared.opts.save(shared.config_filename)


def change_checkpoint(name):
    """#change_checkpoint: A1111 puts the name into the dropdown as given; Forge first passes it through
    sd_models.match_checkpoint_to_name. Returns the dropdown's new value."""
    record("ui_settings.change_checkpoint", name)
    value = sd_models.match_checkpoint_to_name(name) if sd_models.FORGE else name
    checkpoint_dropdown_changed(value)
    return value
