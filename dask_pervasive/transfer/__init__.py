"""Peer-to-peer transfer of context files over Dask's own comms.

When many cold workers need the same context, reading it from the origin
once per worker makes the origin the bottleneck. Workers that hold the files
serve them to the others instead, over the connections Dask already has (so
``distributed.security`` TLS applies and no port is opened). One module per
role, by process:

========================  ==========  =================================================================
module                    process     role
========================  ==========  =================================================================
``_coordinator``          scheduler   :class:`SourceCoordinator`: who copies from whom (origin cap,
                                      upload slots per peer, so a cohort fans out as a tree)
``_server``               worker      :class:`ContextServer`: serves manifest-listed files of its copies
``_receiver``             worker      one context copy: peers first, resume elsewhere, origin fallback
``_stream``               worker      a byte range of a file streamed from a peer, in chunks
``_origin``               worker      origin reads (fsspec) and the one origin-copy driver
``_retry``                worker      retries with backoff and the stall guard for origin calls
``_manifest``             both        the manifest format and its one validator (paths, sizes, hashes)
``_parts``                worker      temporary files, atomic commit, stale-part cleanup
``_filesystem``           worker      :class:`PeerFileSystem`, fsspec protocol ``dask-peer``
========================  ==========  =================================================================

The manifest (relative path → size, sha256) is computed once, by the first
worker that copies from the origin (written last, so only complete copies have
one). That worker hands it to the scheduler's coordinator (trust on first
use), and every later copy is checked against it: file by file against its
source's manifest (or, read from the origin, against the coordinator's), and
as a whole against the coordinator's. What is and is not protected:
``docs/security.md``. Settings come whole, as a
:class:`~dask_pervasive._settings.TransferSettings`.
"""

from __future__ import annotations

from ._coordinator import ORIGIN, WAIT, Lease, SourceCoordinator, coordinator_available
from ._filesystem import PeerFileSystem
from ._manifest import MANIFEST, FetchResult, cached_copy
from ._origin import fetch_source
from ._parts import PART, remove_stale_parts
from ._receiver import fetch_context, peer_fetcher
from ._retry import RetryPolicy
from ._server import ContextServer
from ._stream import stream_from_peer

__all__ = [
    "MANIFEST",
    "ORIGIN",
    "PART",
    "WAIT",
    "ContextServer",
    "FetchResult",
    "Lease",
    "PeerFileSystem",
    "RetryPolicy",
    "SourceCoordinator",
    "cached_copy",
    "coordinator_available",
    "fetch_context",
    "fetch_source",
    "peer_fetcher",
    "remove_stale_parts",
    "stream_from_peer",
]
