"""Temporary files: every file is written under a part name and renamed into place once complete.

A part name says which process writes it (``<final>.part-<host>.<pid>.<random>``),
so :func:`remove_stale_parts` can remove those of dead processes at once
instead of waiting for them to age.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import time
import uuid

#: What every temporary name contains.
PART = ".part-"
_HOST = socket.gethostname().replace("/", "_").replace(os.sep, "_")


def part_name(final: str) -> str:
    """A temporary name next to ``final`` that says which process writes it."""
    return f"{final}{PART}{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:12]}"


def _writer_gone(name: str) -> bool:
    """Whether the temporary file ``name`` was written by a process of this host that is dead."""
    tail = name.rpartition(PART)[2]
    try:
        host, pid, _ = tail.rsplit(".", 2)
        pid = int(pid)
    except ValueError:
        return False  # another naming scheme: only its age tells
    if host != _HOST or pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``."""
    tmp = part_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class PartialFile:
    """A file being received: temporary name, bytes so far, running sha256.

    ``sources`` names where its bytes came from (``"origin"``, peer
    addresses), so a mismatch can be blamed.
    """

    def __init__(self, final: str) -> None:
        self.final = final
        self.tmp = part_name(final)
        os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
        self.fh = open(self.tmp, "wb")  # noqa: SIM115 - closed by commit/discard
        self.hasher = hashlib.sha256()
        self.offset = 0
        self.sources: set[str] = set()

    def absorb(self, data: bytes) -> None:
        self.fh.write(data)
        self.hasher.update(data)
        self.offset += len(data)

    def reset(self) -> None:
        """Forget every byte received (start the file over)."""
        self.fh.seek(0)
        self.fh.truncate()
        self.hasher = hashlib.sha256()
        self.offset = 0
        self.sources.clear()

    def digest(self) -> dict:
        return {"size": self.offset, "sha256": self.hasher.hexdigest()}

    def commit(self, sha256: str | None) -> bool:
        """Rename into place if the content hashes to ``sha256`` (any, if ``None``)."""
        self.fh.close()
        if sha256 is not None and self.hasher.hexdigest() != sha256:
            self.discard()
            return False
        os.replace(self.tmp, self.final)
        return True

    def discard(self) -> None:
        """Close and delete the temporary file (a no-op after a commit)."""
        self.fh.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


def remove_stale_parts(root: str, older_than: float = 3600.0) -> int:
    """Delete temporary files left by killed copies; returns how many.

    Removed: those of processes of this host that are gone (whatever their
    age) and any older than ``older_than`` seconds.
    """
    removed = 0
    cutoff = time.time() - older_than
    for dirpath, _, names in os.walk(root):
        for n in names:
            if PART in n:
                p = os.path.join(dirpath, n)
                try:
                    if _writer_gone(n) or os.path.getmtime(p) < cutoff:
                        os.unlink(p)
                        removed += 1
                except OSError:
                    pass
    return removed
