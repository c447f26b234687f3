"""Content-keyed cache folders written atomically.

A cache entry is a folder named after a hash of its inputs. It is built in a temporary
sibling folder and renamed into place only when complete, so a run killed mid-write
leaves nothing that a later run trusts, and a failed build never touches a good entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path


def file_fingerprint(path: Path) -> dict:
    stat = path.stat()
    return {"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def code_fingerprint(*modules) -> str:
    """Hash of the modules' source files. Put in a cache key, it makes entries built by
    older code unusable, so a change to preprocessing never serves stale results."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def cache_key(*parts) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _build_tag() -> str:
    """Host and process of a build: a shared cache folder may see builds of other hosts."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _remove_stale_builds(root: Path, name: str) -> None:
    """Temporary folders of this host's builds whose process is gone (killed, out of
    memory); another host's builds are left alone (their pids mean nothing here)."""
    host = socket.gethostname()
    for tmp in root.glob(f".{name}.tmp-{host}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def cached_folder(root: Path, name: str, build: Callable[[Path], None]) -> Path:
    """Return `root/name`, building it with `build(tmp_folder)` first if it is absent.

    Several processes may build the same entry at once (ranks of a multi-process run
    started together): the first complete one is kept and the others use it."""
    final = Path(root) / name
    if (final / "COMPLETE").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(final.parent, name)
    tmp = final.parent / f".{name}.tmp-{_build_tag()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build(tmp)
        (tmp / "COMPLETE").write_text("ok\n")
        # Entries appear only complete (renamed into place), so one that exists now is
        # another process's finished build: use it.
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "COMPLETE").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
