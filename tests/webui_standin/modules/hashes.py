"""Stand-in for modules.hashes (+ modules.cache): the sha256 cache behind checkpoint titles "name [shorthash]".

Shaped like A1111 1.10 / Forge: `cache("hashes")` is a dict-like store of {title: {"mtime", "sha256"}} keyed
"checkpoint/<name>"; `sha256_from_cache` trusts an entry only while the file's mtime is not newer; `sha256` hashes
the file (recorded as "hashes.calculate", the cost the extension should spare the host) and stores the result.
"""

import hashlib
import os

from . import record, shared

caches: dict = {}


def cache(subsection):
    return caches.setdefault(subsection, {})


def dump_cache():
    record("hashes.dump_cache")


def sha256_from_cache(filename, title, use_addnet_hash=False):
    hashes = cache("hashes-addnet") if use_addnet_hash else cache("hashes")
    try:
        ondisk_mtime = os.path.getmtime(filename)
    except FileNotFoundError:
        return None
    if title not in hashes:
        return None
    cached_sha256 = hashes[title].get("sha256", None)
    cached_mtime = hashes[title].get("mtime", 0)
    if ondisk_mtime > cached_mtime or cached_sha256 is None:
        return None
    return cached_sha256


def sha256(filename, title, use_addnet_hash=False):
    value = sha256_from_cache(filename, title, use_addnet_hash)
    if value is not None:
        return value
    if shared.cmd_opts.no_hashing:
        return None
    record("hashes.calculate", os.path.basename(filename))
    h = hashlib.sha256()
    with open(filename, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    value = h.hexdigest()
    cache("hashes")[title] = {"mtime": os.path.getmtime(filename), "sha256": value}
    dump_cache()
    return value
