"""The digests that seal what the store keeps (pure functions over plain values; no database, no torch).

Three kinds, all hex SHA-256 over an unambiguous encoding: canonical JSON (sorted keys, no spaces, ASCII escapes)
for the row digests, length-prefixed strings for the chains (hashed once per record, so kept cheap):

* **chains** over the written record, extended one record at a time, so a commit computes the chain of turn
  ``t + 1`` from turn ``t``'s in O(new records) and a load never reads the record to know it:

  - :func:`extend_history` over the message digests only: the engine compares a resent history with it
    (``history_digest`` of the first ``n`` records = chain of the first ``n`` messages' digests);
  - :func:`extend_records` over whole records (index, role, digest, tokens): what the full record must hash to.

* :func:`tensors_digest` / :func:`window_digest`: the tensor table (name, dtype, shape, data checksum, in
  order) and the window (index, role, content, tokens, in order) of one snapshot.
* :func:`snapshot_digest`: one snapshot row's facts (turn, counts, chains, the two digests above); a row can be
  verified alone, without reading its children. :func:`header_digest`: a session's identity, fingerprints and
  metadata.

These detect damage and edits made behind the store's back; they are not a signature: whoever can write the
database can also recompute them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "EMPTY_CHAIN",
    "SNAPSHOT_DIGEST_VERSION",
    "canonical_json",
    "extend_history",
    "extend_records",
    "header_digest",
    "snapshot_digest",
    "tensors_digest",
    "window_digest",
]

#: The chain of an empty record.
EMPTY_CHAIN = ""
#: Bumped if the encoding below ever changes (it is part of every snapshot digest).
SNAPSHOT_DIGEST_VERSION = 1


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def extend_history(chain: str, digests: Iterable[str]) -> str:
    """The history chain after appending messages with these digests (``chain`` = :data:`EMPTY_CHAIN` to start).

    Length-prefixed rather than JSON: a caller hashes its whole resent history with this on every call."""
    for digest in digests:
        text = f"h{len(chain)}:{chain}{len(digest)}:{digest}"
        chain = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return chain


def extend_records(chain: str, records: Iterable[Any]) -> str:
    """The record chain after appending these records (objects with ``index, role, digest, tokens``; the two
    integers as decimals, the strings length-prefixed, so the encoding is unambiguous and cheap)."""
    for r in records:
        chain = hashlib.sha256(
            f"r{len(chain)}:{chain}{int(r.index)}|{len(r.role)}:{r.role}{len(r.digest)}:{r.digest}{int(r.tokens)}|"
            .encode("utf-8", "surrogatepass")
        ).hexdigest()
    return chain


def tensors_digest(tensors: Sequence[tuple[str, str, Sequence[int], str]]) -> str:
    """``tensors``: ``(name, dtype, shape, data checksum)`` in stored order."""
    return _sha(canonical_json(["t", [[n, d, list(s), c] for n, d, s, c in tensors]]))


def window_digest(messages: Iterable[Any]) -> str:
    """``messages``: objects with ``index, role, content, tokens``, in window order."""
    return _sha(canonical_json(["w", [[m.index, m.role, m.content, m.tokens] for m in messages]]))


def snapshot_digest(*, turn: int, written_count: int, written_tokens: int, first_digest: str, history_digest: str,
                    record_digest: str, tensor_count: int, state_bytes: int, window_count: int,
                    tensors_digest: str, window_digest: str) -> str:
    facts = {
        "v": SNAPSHOT_DIGEST_VERSION, "turn": turn, "written_count": written_count, "written_tokens": written_tokens,
        "first_digest": first_digest, "history_digest": history_digest, "record_digest": record_digest,
        "tensor_count": tensor_count, "state_bytes": state_bytes, "window_count": window_count,
        "tensors_digest": tensors_digest, "window_digest": window_digest,
    }
    return _sha(canonical_json(["s", facts]))


def header_digest(namespace: str, session_id: str, model_fingerprint: str, adapter_fingerprint: str,
                  metadata: Any) -> str:
    """``metadata`` as the database hands it back (so a JSON type that normalises numbers cannot cause a false
    alarm)."""
    return _sha(canonical_json(["h1", namespace, session_id, model_fingerprint, adapter_fingerprint, metadata]))
