"""Validation of what goes into and comes out of the store: state blobs and message records.

Nothing here touches a database; :mod:`.ops` calls these before writing (so a bad offer writes nothing) and
after reading (so damaged rows never reach the engine).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .base import ALLOWED_DTYPES, CorruptStateError, RecordSummary, TensorBlob, WindowMessage, WrittenMessage
from .digests import (
    EMPTY_CHAIN,
    extend_history,
    extend_records,
    snapshot_digest,
    tensors_digest,
    window_digest,
)

__all__ = [
    "ITEMSIZE",
    "SnapshotFacts",
    "check_continues",
    "check_fingerprints",
    "check_shape",
    "check_text",
    "expected_nbytes",
    "prepare_blob",
    "prepare_metadata",
    "prepare_state",
    "prepare_window",
    "prepare_written",
    "record_problem",
    "sha256_hex",
    "text_problem",
    "verify_blob",
]

#: Bytes per element of each allowed dtype.
ITEMSIZE: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int64": 8,
    "int32": 4,
}
assert set(ITEMSIZE) == set(ALLOWED_DTYPES), "ITEMSIZE must cover exactly ALLOWED_DTYPES"


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored as text by every backend, or None.

    PostgreSQL ``text`` cannot hold NUL, and no UTF-8 database can hold a lone surrogate (``"\\ud800"``, which
    Python strings allow); SQLite would take both. Refusing them everywhere gives one behaviour on both.
    """
    if "\x00" in value:
        return f"contains a NUL character at position {value.index(chr(0))}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"contains a lone surrogate {value[exc.start]!r} at position {exc.start} (not valid Unicode text)"
    return None


def check_text(value: Any, what: str) -> str:
    """Return ``value`` if it is a string every backend can store, else raise :class:`CorruptStateError`."""
    if not isinstance(value, str):
        raise CorruptStateError(f"{what} must be a string, got {type(value).__name__}")
    problem = text_problem(value)
    if problem:
        raise CorruptStateError(f"{what} {problem}")
    return value


def _json_strings(value: Any) -> Any:
    """Every string in a JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _json_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _json_strings(v)


def prepare_metadata(metadata: Any) -> dict[str, Any]:
    """Validate session metadata: a JSON-serialisable dict of text every backend can store (PostgreSQL's JSONB
    refuses NUL). Returned as a JSON round trip, so what is stored is exactly what a later read returns."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise CorruptStateError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        value = json.loads(json.dumps(metadata, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise CorruptStateError(f"metadata must be JSON-serialisable: {exc}") from exc
    for text in _json_strings(value):
        check_text(text, "metadata text")
    return value


def check_fingerprints(model_fingerprint: Any, adapter_fingerprint: Any) -> None:
    for what, value in (("model_fingerprint", model_fingerprint), ("adapter_fingerprint", adapter_fingerprint)):
        if not isinstance(value, str):
            raise TypeError(f"{what} must be a string, got {type(value).__name__}")
        check_text(value, what)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_shape(shape: Any, what: str) -> tuple[int, ...]:
    if not isinstance(shape, list | tuple) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CorruptStateError(f"{what}: shape must be a sequence of non-negative integers, got {shape!r}")
    return tuple(shape)


def expected_nbytes(dtype: str, shape: Sequence[int], what: str) -> int:
    if dtype not in ITEMSIZE:
        raise CorruptStateError(f"{what}: dtype {dtype!r} is not one of {', '.join(ALLOWED_DTYPES)}")
    return math.prod(shape) * ITEMSIZE[dtype]


def prepare_blob(blob: TensorBlob) -> TensorBlob:
    """Validate a blob offered for writing; return it with ``data`` as ``bytes`` and its checksum filled in.

    Raises :class:`CorruptStateError` for a bad name, dtype, shape, size or a checksum that does not match.
    """
    if not isinstance(blob, TensorBlob):
        raise CorruptStateError(f"state entries must be TensorBlob, got {type(blob).__name__}")
    what = f"state tensor {blob.name!r}"
    if not isinstance(blob.name, str) or not blob.name or len(blob.name) > 256:
        raise CorruptStateError(f"{what}: name must be a non-empty string of at most 256 characters")
    shape = check_shape(blob.shape, what)
    if not isinstance(blob.data, bytes | bytearray | memoryview):
        raise CorruptStateError(f"{what}: data must be bytes, got {type(blob.data).__name__}")
    data = bytes(blob.data)
    nbytes = expected_nbytes(blob.dtype, shape, what)
    if len(data) != nbytes:
        raise CorruptStateError(
            f"{what}: {len(data)} bytes, but {blob.dtype} × {list(shape)} needs {nbytes}"
        )
    checksum = sha256_hex(data)
    if blob.checksum and blob.checksum.lower() != checksum:
        raise CorruptStateError(f"{what}: checksum {blob.checksum!r} does not match its data")
    return TensorBlob(name=blob.name, dtype=blob.dtype, shape=shape, data=data, checksum=checksum)


def prepare_state(state: Sequence[TensorBlob]) -> list[TensorBlob]:
    blobs = [prepare_blob(blob) for blob in state]
    names = [blob.name for blob in blobs]
    if len(set(names)) != len(names):
        raise CorruptStateError(f"state tensor names must be unique, got {names}")
    return blobs


def verify_blob(name: str, dtype: str, shape: Any, data: Any, checksum: str) -> TensorBlob:
    """Turn a stored row back into a :class:`TensorBlob`, verifying size and checksum."""
    what = f"stored state tensor {name!r}"
    shape = check_shape(shape, what)
    data = bytes(data)  # some drivers hand back memoryview
    nbytes = expected_nbytes(dtype, shape, what)
    if len(data) != nbytes:
        raise CorruptStateError(f"{what}: {len(data)} bytes, but {dtype} × {list(shape)} needs {nbytes}")
    if sha256_hex(data) != checksum:
        raise CorruptStateError(f"{what}: checksum mismatch (the stored bytes were altered or damaged)")
    return TensorBlob(name=name, dtype=dtype, shape=shape, data=data, checksum=checksum)


def _check_message(message: Any, cls: type, what: str) -> None:
    if not isinstance(message, cls):
        raise CorruptStateError(f"{what} entries must be {cls.__name__}, got {type(message).__name__}")
    if not _is_int(message.index) or message.index < 0:
        raise CorruptStateError(f"{what}: index must be a non-negative integer, got {message.index!r}")
    if not _is_int(message.tokens) or message.tokens < 0:
        raise CorruptStateError(f"{what}: tokens must be a non-negative integer, got {message.tokens!r}")
    if not isinstance(message.role, str) or len(message.role) > 64:
        raise CorruptStateError(f"{what}: role must be a string of at most 64 characters")
    check_text(message.role, f"{what} message {message.index}: role")


def prepare_written(written: Sequence[WrittenMessage]) -> list[WrittenMessage]:
    records = list(written)
    for record in records:
        _check_message(record, WrittenMessage, "written")
        if not isinstance(record.digest, str) or not record.digest or len(record.digest) > 128:
            raise CorruptStateError(f"written: digest must be a non-empty string, got {record.digest!r}")
        check_text(record.digest, f"written message {record.index}: digest")
    indexes = [record.index for record in records]
    if len(set(indexes)) != len(indexes):
        raise CorruptStateError(f"written: a turn cannot write the same message index twice, got {indexes}")
    return records


def check_continues(records: Sequence[WrittenMessage], count: int) -> None:
    """Records written on top of a record of ``count`` messages must be indexes ``count, count+1, …`` in order:
    an index is a position in the history, so a gap or a repeat would make two records claim one message."""
    indexes = [r.index for r in records]
    expected = list(range(count, count + len(records)))
    if indexes != expected:
        raise CorruptStateError(
            f"written: the record holds {count} messages, so this turn must write indexes {expected} "
            f"(in order, no gaps), got {indexes}"
        )


def prepare_window(window: Sequence[WindowMessage]) -> list[WindowMessage]:
    messages = list(window)
    for message in messages:
        _check_message(message, WindowMessage, "window")
        check_text(message.content, f"window message {message.index}: content")
    return messages


# ---------------------------------------------------------------------------------------------- snapshot facts
@dataclass(frozen=True)
class SnapshotFacts:
    """What one snapshot row states about its turn, sealed by :meth:`digest` (see :mod:`.digests`).

    The record chains and counts are cumulative (turns ``1..turn``); ``tensors_digest``/``window_digest`` seal
    the turn's child rows. A commit derives turn ``t + 1``'s facts from its base turn's with :meth:`after`.
    """

    turn: int
    written_count: int
    written_tokens: int
    first_digest: str
    history_digest: str
    record_digest: str
    tensor_count: int
    state_bytes: int
    window_count: int
    tensors_digest: str
    window_digest: str

    @classmethod
    def fresh(cls, turn: int = 0) -> SnapshotFacts:
        """Turn 0: zero state, nothing written, empty window."""
        return cls(turn, 0, 0, "", EMPTY_CHAIN, EMPTY_CHAIN, 0, 0, 0, tensors_digest([]), window_digest([]))

    @classmethod
    def from_row(cls, row: Any) -> SnapshotFacts:
        return cls(int(row.turn), int(row.written_count), int(row.written_tokens), row.first_digest,
                   row.history_digest, row.record_digest, int(row.tensor_count), int(row.state_bytes),
                   int(row.window_count), row.tensors_digest, row.window_digest)

    def after(self, turn: int, state: Sequence[TensorBlob], written: Sequence[WrittenMessage],
              window: Sequence[WindowMessage]) -> SnapshotFacts:
        """The facts of ``turn`` written on top of this snapshot (inputs already validated)."""
        first = self.first_digest if self.written_count else (written[0].digest if written else "")
        return SnapshotFacts(
            turn=turn,
            written_count=self.written_count + len(written),
            written_tokens=self.written_tokens + sum(r.tokens for r in written),
            first_digest=first,
            history_digest=extend_history(self.history_digest, (r.digest for r in written)),
            record_digest=extend_records(self.record_digest, written),
            tensor_count=len(state),
            state_bytes=sum(len(b.data) for b in state),
            window_count=len(window),
            tensors_digest=tensors_digest([(b.name, b.dtype, b.shape, b.checksum) for b in state]),
            window_digest=window_digest(window),
        )

    def digest(self) -> str:
        return snapshot_digest(**asdict(self))

    def columns(self) -> dict[str, Any]:
        """The snapshot row's columns (without keys and timestamps), digest included."""
        return {**asdict(self), "digest": self.digest()}

    def summary(self) -> RecordSummary:
        return RecordSummary(self.written_count, self.written_tokens, self.first_digest, self.history_digest)


def record_problem(records: Sequence[WrittenMessage], facts: SnapshotFacts) -> str | None:
    """Why a full record read back does not match its snapshot's facts, or None."""
    indexes = [r.index for r in records]
    if indexes != list(range(len(records))):
        return "its indexes are not 0, 1, 2, … in order (a row was lost, added or renumbered)"
    if len(records) != facts.written_count:
        return f"it holds {len(records)} records, the snapshot says {facts.written_count}"
    if extend_records(EMPTY_CHAIN, records) != facts.record_digest:
        return "a record's role, digest or token count was altered (record chain mismatch)"
    return None
