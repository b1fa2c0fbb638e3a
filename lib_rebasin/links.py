"""Where the documentation lives, for pointers shown to users (the tab's result card).

The project publishes no documentation URL, so a pointer names a file of the installed extension by its path
relative to the extension's folder (the folder under the WebUI's `extensions/`, or the checkout): every install has
it, and it reveals nothing about the server's own folders, as an absolute path would to whoever opens the page.
Should a URL be published one day, this is the one place to change.
"""

DOCS = "docs"
# Which merge method keeps what, measured on trained models (summaries of the quality and speed benchmarks).
MERGE_QUALITY = f"{DOCS}/benchmarks.md"
