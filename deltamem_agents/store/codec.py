"""Validation of what goes into and comes out of the store: state blobs and message records.

Nothing here touches a database; :mod:`.ops` calls these before writing (so a bad offer writes nothing) and
after reading (so damaged rows never reach the engine).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

from .base import ALLOWED_DTYPES, CorruptStateError, TensorBlob, WindowMessage, WrittenMessage

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


def prepare_written(written: Sequence[WrittenMessage]) -> list[WrittenMessage]:
    records = list(written)
    for record in records:
        _check_message(record, WrittenMessage, "written")
        if not isinstance(record.digest, str) or not record.digest or len(record.digest) > 128:
            raise CorruptStateError(f"written: digest must be a non-empty string, got {record.digest!r}")
    indexes = [record.index for record in records]
    if len(set(indexes)) != len(indexes):
        raise CorruptStateError(f"written: a turn cannot write the same message index twice, got {indexes}")
    return records


def prepare_window(window: Sequence[WindowMessage]) -> list[WindowMessage]:
    messages = list(window)
    for message in messages:
        _check_message(message, WindowMessage, "window")
        if not isinstance(message.content, str):
            raise CorruptStateError("window: content must be a string")
    return messages
