"""Temporary files: every file is written under a part name and renamed into place once complete.

A part name starts with the reserved prefix :data:`RESERVED` (which no file of
a context may use: :func:`~._manifest.safe_relpath` and
:func:`~._manifest.safe_name` refuse it) and says which process writes it
(``.pervasive-part-<host hash>.<pid>.<random>.<file>``), so
:func:`remove_stale_parts` removes only temporary files, never a context's
own (``shard.part-00001.bin``), and those of dead processes at once instead
of waiting for them to age.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import time
import uuid

from ..errors import TransferError

#: Names (of any path segment) reserved for dask_pervasive's own files in a copy's directory.
RESERVED = ".pervasive-"
#: What every temporary name starts with.
PART = f"{RESERVED}part-"
#: The host in part names: a hash, so it has no dots and no separators.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:12]
#: Files are hashed in blocks of this size too (the manifest's ``"blocks"``), so that a ranged read
#: can be verified without reading the whole file. A constant: every copy computes the same list.
BLOCK_SIZE = 4 * 2**20
_KEEP_OF_NAME = 64  # characters of the final name kept in a part name (for people; names stay < 255)


def part_name(final: str) -> str:
    """A temporary name next to ``final`` that says which process writes it."""
    head, base = os.path.split(final)
    name = f"{PART}{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:12]}.{base[:_KEEP_OF_NAME]}"
    return os.path.join(head, name)


def is_part(name: str) -> bool:
    """Whether the file name ``name`` (no directory) is a temporary file."""
    return name.startswith(PART)


def _writer_gone(name: str) -> bool:
    """Whether the temporary file ``name`` was written by a process of this host that is dead."""
    try:
        host, pid, _, _ = name[len(PART) :].split(".", 3)
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


class LocalWriteError(TransferError):
    """Writing a received file to this worker's disk failed (disk full, quota, I/O error).

    The receiver's fault, never the source's: not retried against the
    source, and the source is not blamed (no cool-down, not suspect).
    """


class PartialFile:
    """A file being received: temporary name, bytes so far, running sha256.

    The temporary file holds exactly the bytes hashed so far: a write that
    fails part-way (``ENOSPC`` after part of a chunk reached the disk) is cut
    back to the last verified offset, and :meth:`commit` checks the size on
    disk before renaming. ``sources`` names where its bytes came from
    (``"origin"``, peer addresses), so a mismatch can be blamed.
    """

    def __init__(self, final: str) -> None:
        self.final = final
        self.tmp = part_name(final)
        os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
        # Unbuffered: every byte handed to write() is on its way to the disk or the write
        # failed, so a failed write can be cut back (a buffered writer keeps torn data in its buffer).
        self.fh = open(self.tmp, "wb", buffering=0)  # noqa: SIM115 - closed by commit/discard
        self.hasher = hashlib.sha256()
        self.offset = 0
        self.sources: set[str] = set()
        self._torn: OSError | None = None  #: a failed write that could not be cut back
        self.blocks: list[str] = []  #: sha256 of each complete BLOCK_SIZE block so far
        self._block = hashlib.sha256()

    def _failed(self, exc: OSError, doing: str) -> LocalWriteError:
        return LocalWriteError(f"{doing} {self.tmp} on this worker failed: {exc} (the receiver's disk, not the source)")

    def absorb(self, data: bytes) -> None:
        """Append ``data``; on a local write error the file is cut back to what was hashed.

        Raises
        ------
        LocalWriteError
            The write failed (chained to the ``OSError``).
        """
        if self._torn is not None:
            raise self._failed(self._torn, "writing") from self._torn
        view = memoryview(data)
        try:
            while view:
                n = self.fh.write(view)
                view = view[n or 0 :]
        except OSError as exc:
            self._rewind(exc)
            raise self._failed(exc, "writing") from exc
        self.hasher.update(data)
        self._hash_blocks(data)
        self.offset += len(data)

    def _hash_blocks(self, data: bytes) -> None:
        at, pos = self.offset, 0
        while pos < len(data):
            take = min(len(data) - pos, BLOCK_SIZE - at % BLOCK_SIZE)
            self._block.update(memoryview(data)[pos : pos + take])
            pos += take
            at += take
            if at % BLOCK_SIZE == 0:
                self.blocks.append(self._block.hexdigest())
                self._block = hashlib.sha256()

    def block_digests(self) -> list[str]:
        """sha256 of each :data:`BLOCK_SIZE` block of the bytes so far (the last one may be short)."""
        tail = [self._block.hexdigest()] if self.offset % BLOCK_SIZE else []
        return self.blocks + tail

    def _rewind(self, exc: OSError) -> None:
        """Cut the file back to the bytes hashed (a torn write may have left part of a chunk)."""
        try:
            os.ftruncate(self.fh.fileno(), self.offset)
            self.fh.seek(self.offset)
        except OSError:
            self._torn = exc  # unusable: reset() or discard()

    def reset(self) -> None:
        """Forget every byte received (start the file over)."""
        os.ftruncate(self.fh.fileno(), 0)
        self.fh.seek(0)
        self._torn = None
        self.hasher = hashlib.sha256()
        self.blocks, self._block = [], hashlib.sha256()
        self.offset = 0
        self.sources.clear()

    def digest(self) -> dict:
        return {"size": self.offset, "sha256": self.hasher.hexdigest()}

    def commit(self, sha256: str | None) -> bool:
        """Rename into place if the content hashes to ``sha256`` (any, if ``None``).

        Raises
        ------
        LocalWriteError
            The file on disk is not the bytes hashed (a failed write), or closing it failed.
        """
        try:
            on_disk = os.fstat(self.fh.fileno()).st_size
            self.fh.close()
        except OSError as exc:
            self.discard()
            raise self._failed(exc, "closing") from exc
        if self._torn is not None or on_disk != self.offset:
            self.discard()
            raise LocalWriteError(
                f"{self.tmp} holds {on_disk} bytes but {self.offset} were received and hashed; not committed"
            )
        if sha256 is not None and self.hasher.hexdigest() != sha256:
            self.discard()
            return False
        os.replace(self.tmp, self.final)
        return True

    def discard(self) -> None:
        """Close and delete the temporary file (a no-op after a commit)."""
        with contextlib.suppress(OSError):
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
            if is_part(n):
                p = os.path.join(dirpath, n)
                try:
                    if _writer_gone(n) or os.path.getmtime(p) < cutoff:
                        os.unlink(p)
                        removed += 1
                except OSError:
                    pass
    return removed
