"""The WebUI adapter's modules, behind the entry point scripts/rebasin_tab.py (the only file the host loads).

A folder, not files beside rebasin_tab.py: AUTOMATIC1111 and Forge load every *.py file directly in an extension's
scripts/ folder as a script of its own, each by file path (modules/scripts.py list_scripts, extensions.list_files),
but never a folder. rebasin_tab.py puts scripts/ on sys.path and imports these by name, so each is in sys.modules
once: one WebUIHost class, one set of wrappers on the host's functions (a module loaded by path twice would be two
copies with two states).
"""
