"""The Re-Basin merge tab, shared by the WebUI extension and the standalone app.

Nothing here imports gradio or the WebUI at import time: `host` and `service` are plain Python, `tab` imports
gradio only inside `build_tab`, and each host (the A1111/Forge adapter in `scripts/rebasin_tab.py`, the
standalone "generate nothing" host in `standalone`) supplies what the tab needs through the `Host` protocol.
"""
