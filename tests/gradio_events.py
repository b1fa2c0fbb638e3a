"""The Python function gradio runs for one event of one component (both gradio lines' config formats), so UI
tests can call a tab's handlers exactly as the page would."""


def fn_for(blocks, component, event="click"):
    for i, dep in enumerate(blocks.get_config_file()["dependencies"]):
        targets = [t[0] if isinstance(t, (list, tuple)) else t for t in dep.get("targets", [])]
        trigger = dep.get("trigger") or (dep["targets"][0][1] if dep.get("targets") and
                                         isinstance(dep["targets"][0], (list, tuple)) else None)
        if component._id in targets and trigger == event:
            return blocks.fns[i].fn
    raise AssertionError(f"no {event} listener on {component}")
