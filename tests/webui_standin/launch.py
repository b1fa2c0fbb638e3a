"""Stand-in for the WebUI's `launch` module as install.py sees it: is_installed / run_pip, recorded."""

import importlib.util

calls = []
missing = set()  # tests put distribution names here to pretend they are absent


def is_installed(package):
    calls.append(("is_installed", package))
    if package in missing:
        return False
    return importlib.util.find_spec(package) is not None


def run_pip(command, desc=None, live=False):
    calls.append(("run_pip", command, desc))
