"""Backend-free pieces: URL normalisation, blob validation, the default location, and the no-torch rule."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from deltamem_agents.store import (
    ALLOWED_DTYPES,
    ITEMSIZE,
    CorruptStateError,
    SQLSessionStore,
    TensorBlob,
    default_sqlite_path,
    normalize_url,
    sha256_hex,
)
from deltamem_agents.store.codec import prepare_blob, verify_blob

STORE_DIR = Path(__file__).resolve().parents[2] / "deltamem_agents" / "store"


@pytest.mark.parametrize(
    ("given", "sync", "async_"),
    [
        ("postgresql://u:p@h:5432/db", "postgresql+psycopg", "postgresql+asyncpg"),
        ("postgres://u@h/db", "postgresql+psycopg", "postgresql+asyncpg"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg", "postgresql+psycopg"),
        ("postgresql+asyncpg://u@h/db", "postgresql+psycopg", "postgresql+asyncpg"),
        ("sqlite:////tmp/x.db", "sqlite+pysqlite", "sqlite+aiosqlite"),
        ("sqlite+aiosqlite:////tmp/x.db", "sqlite+pysqlite", "sqlite+aiosqlite"),
        ("/tmp/x.db", "sqlite+pysqlite", "sqlite+aiosqlite"),
    ],
)
def test_normalize_url(given, sync, async_):
    assert normalize_url(given).drivername == sync
    assert normalize_url(given, async_=True).drivername == async_
    assert normalize_url(given).database == normalize_url(given, async_=True).database


def test_normalize_url_keeps_credentials_and_refuses_other_databases():
    url = normalize_url("postgresql://user:secret@host:6543/db?sslmode=require")
    assert (url.username, url.password, url.port, url.query["sslmode"]) == ("user", "secret", 6543, "require")
    with pytest.raises(ValueError, match="unsupported"):
        normalize_url("mysql://u@h/db")


def test_default_location_is_in_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTAMEM_CACHE_DIR", str(tmp_path / "cache"))
    assert default_sqlite_path() == tmp_path / "cache" / "sessions.db"
    with SQLSessionStore() as store:  # creates the directory and the file
        store.create("s", model_fingerprint="m", adapter_fingerprint="a")
        assert "sessions.db" in store.url
    assert default_sqlite_path().is_file()


def test_memory_sqlite(tmp_path):
    with SQLSessionStore("sqlite://") as store:
        store.create("s", model_fingerprint="m", adapter_fingerprint="a")
        assert store.exists("s")


def test_sqlite_pragmas(tmp_path):
    with SQLSessionStore(str(tmp_path / "p.db"), busy_timeout_s=7) as store, store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 7000


def test_itemsizes_cover_allowed_dtypes():
    assert set(ITEMSIZE) == set(ALLOWED_DTYPES)


def test_prepare_and_verify_blob_roundtrip():
    blob = prepare_blob(TensorBlob("t", "bfloat16", [2, 3], bytearray(12)))
    assert blob.shape == (2, 3) and isinstance(blob.data, bytes) and blob.checksum == sha256_hex(bytes(12))
    again = verify_blob(blob.name, blob.dtype, list(blob.shape), memoryview(blob.data), blob.checksum)
    assert again == blob
    with pytest.raises(CorruptStateError):
        verify_blob("t", "bfloat16", [2, 3], bytes(12), "0" * 64)
    with pytest.raises(CorruptStateError):
        verify_blob("t", "bfloat16", "oops", bytes(12), blob.checksum)
    with pytest.raises(CorruptStateError):
        prepare_blob(TensorBlob("t", "float32", (True,), bytes(4)))  # a bool is not a dimension


def test_store_never_imports_torch():
    """Statically: no module of the store imports torch, transformers or the model code."""
    forbidden = {"torch", "transformers", "deltamem_agents.adapter", "deltamem_agents.models"}
    for path in STORE_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [("." * node.level) + node.module]
            for name in names:
                root = name.lstrip(".").split(".")[0]
                assert root not in forbidden and name not in forbidden, f"{path.name} imports {name}"
                assert not name.startswith(("..adapter", "..models")), f"{path.name} imports {name}"


def test_chains_extend_in_any_split():
    """A commit extends the previous turn's chain; any split of the same records gives the same chain, and any
    change of one record (or of the order) another."""
    from deltamem_agents.store import WrittenMessage
    from deltamem_agents.store.digests import EMPTY_CHAIN, extend_history, extend_records

    records = [WrittenMessage(i, "user" if i % 2 else "assistant", f"{i:064x}", i + 1) for i in range(7)]
    whole = extend_records(EMPTY_CHAIN, records)
    for cut in range(8):
        assert extend_records(extend_records(EMPTY_CHAIN, records[:cut]), records[cut:]) == whole
    digests = [r.digest for r in records]
    assert extend_history(extend_history(EMPTY_CHAIN, digests[:3]), digests[3:]) == extend_history(EMPTY_CHAIN, digests)
    changed = {whole}
    for i in range(7):
        for field, value in (("role", "system"), ("digest", "f" * 64), ("tokens", 99), ("index", 50)):
            edited = list(records)
            edited[i] = WrittenMessage(**{**records[i].__dict__, field: value})
            changed.add(extend_records(EMPTY_CHAIN, edited))
    assert len(changed) == 1 + 7 * 4
    assert extend_records(EMPTY_CHAIN, records[::-1]) != whole
    # length prefixes keep the encoding unambiguous: moving characters between fields changes the chain
    a = extend_history(EMPTY_CHAIN, ["ab", "c"])
    assert a != extend_history(EMPTY_CHAIN, ["a", "bc"]) and a != extend_history(EMPTY_CHAIN, ["abc"])


@pytest.mark.parametrize(
    ("text", "problem"),
    [("fine ü 🎉", None), ("a\x00b", "NUL"), ("\ud800", "surrogate"), ("x\udfffy", "surrogate"), ("", None)],
)
def test_text_problem(text, problem):
    from deltamem_agents.store.codec import text_problem

    found = text_problem(text)
    assert (found is None) if problem is None else (problem in found)
