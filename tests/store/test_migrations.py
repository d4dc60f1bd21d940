"""Migrations: a fresh database gets the schema, upgrading is idempotent, and the result matches schema.py."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from deltamem_agents.store import (
    SchemaVersionError,
    SQLSessionStore,
    current_version,
    latest_version,
    normalize_url,
    upgrade,
    upgrade_database,
)
from deltamem_agents.store.migrate import VERSION_TABLE, migrations
from deltamem_agents.store.schema import Base

from .conftest import postgres_url


@pytest.fixture
def fresh_url(backend: str, tmp_path) -> Iterator[str]:
    """An empty database: a new SQLite file, or a new schema on the PostgreSQL server (via search_path)."""
    if backend == "sqlite":
        yield str(tmp_path / "fresh.db")
        return
    base = normalize_url(postgres_url())
    schema = f"mig_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield base.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def test_migration_files_are_complete():
    found = migrations()
    assert [m.version for m in found] == list(range(1, len(found) + 1))
    assert found[0].name == "0001_initial" and latest_version() == len(found)
    for m in found:
        assert m.statements("sqlite") and m.statements("postgresql")


def test_fresh_database_gets_schema_and_upgrade_is_idempotent(fresh_url):
    assert current_version(fresh_url) == 0
    assert upgrade_database(fresh_url) == [m.name for m in migrations()]
    assert current_version(fresh_url) == latest_version()
    assert upgrade(fresh_url) == []  # twice: nothing to do
    assert upgrade(fresh_url) == []
    engine = create_engine(normalize_url(fresh_url))
    with engine.connect() as conn:
        rows = conn.execute(text(f"SELECT version, name FROM {VERSION_TABLE} ORDER BY version")).all()
    engine.dispose()
    assert [tuple(r) for r in rows] == [(m.version, m.name) for m in migrations()]


def test_migrated_schema_matches_models(fresh_url):
    """The SQL files and schema.py describe the same tables, keys, indexes and cascades."""
    upgrade(fresh_url)
    engine = create_engine(normalize_url(fresh_url))
    insp = inspect(engine)
    try:
        assert set(insp.get_table_names()) == set(Base.metadata.tables) | {VERSION_TABLE}
        for name, table in Base.metadata.tables.items():
            assert {c["name"] for c in insp.get_columns(name)} == {c.name for c in table.columns}, name
            assert set(insp.get_pk_constraint(name)["constrained_columns"]) == {c.name for c in table.primary_key}
            want_idx = {(i.name, tuple(c.name for c in i.columns)) for i in table.indexes}
            got_idx = {(i["name"], tuple(i["column_names"])) for i in insp.get_indexes(name)}
            assert want_idx <= got_idx, name
            want_uq = {tuple(c.name for c in u.columns) for u in table.constraints
                       if u.__class__.__name__ == "UniqueConstraint"}
            assert want_uq == {tuple(u["column_names"]) for u in insp.get_unique_constraints(name)}, name
            want_fk = {(tuple(fk.column_keys), fk.referred_table.name, fk.ondelete) for fk in table.foreign_key_constraints}
            got_fk = {(tuple(fk["constrained_columns"]), fk["referred_table"], fk["options"].get("ondelete"))
                      for fk in insp.get_foreign_keys(name)}
            assert want_fk == got_fk, name
    finally:
        engine.dispose()


def test_store_opens_fresh_database(fresh_url):
    with SQLSessionStore(fresh_url) as store:
        store.create("s", model_fingerprint="m", adapter_fingerprint="a")
        assert store.exists("s")
    assert current_version(fresh_url) == latest_version()


def test_auto_migrate_false_refuses_old_schema(fresh_url):
    with pytest.raises(SchemaVersionError, match="deltamem db upgrade"):
        SQLSessionStore(fresh_url, auto_migrate=False)
    upgrade(fresh_url)
    SQLSessionStore(fresh_url, auto_migrate=False).close()


def test_newer_schema_is_refused(fresh_url):
    upgrade(fresh_url)
    engine = create_engine(normalize_url(fresh_url))
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {VERSION_TABLE} (version, name, applied_at) VALUES (99, 'future', 'now')"))
    engine.dispose()
    with pytest.raises(SchemaVersionError):
        SQLSessionStore(fresh_url, auto_migrate=False)
    # The upgrade path takes its lock only when something is pending; 99 != latest, so it checks and refuses.
    with pytest.raises(SchemaVersionError, match="newer"):
        upgrade(fresh_url)


def test_concurrent_upgrades_apply_each_migration_once(fresh_url):
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(upgrade(fresh_url))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(name for r in results for name in r) == [m.name for m in migrations()]
    assert current_version(fresh_url) == latest_version()


def test_upgrade_accepts_an_engine(tmp_path):
    from deltamem_agents.store.connect import make_engine

    engine = make_engine(str(tmp_path / "e.db"))
    assert upgrade(engine) == [m.name for m in migrations()]
    assert current_version(engine) == latest_version()
    engine.dispose()


def test_pg_url_forms_are_normalised():
    assert make_url(str(normalize_url("postgresql://u@h/db"))).drivername == "postgresql+psycopg"


# ---------------------------------------------------------------------------------------------- schema 1 → 2
def _schema1_database(url: str, monkeypatch) -> None:
    """A database at schema 1, as deltamem before the digests left it."""
    from deltamem_agents.store import migrate

    shipped = migrations()
    monkeypatch.setattr(migrate, "migrations", lambda: shipped[:1])
    assert upgrade(url) == ["0001_initial"]
    monkeypatch.undo()


def _write_schema1_session(engine, ns: str, sid: str, turns: list[dict], metadata: dict) -> None:
    """Rows exactly as the schema-1 store wrote them (no digest columns exist yet)."""
    from datetime import UTC, datetime

    from sqlalchemy import insert

    from deltamem_agents.store import sha256_hex
    from deltamem_agents.store.ops import SESSIONS, SNAPSHOTS, TENSORS, WINDOW, WRITTEN

    now = datetime.now(UTC)
    with engine.begin() as conn:
        pk = conn.execute(insert(SESSIONS).values(
            session_id=sid, namespace=ns, model_fingerprint="m", adapter_fingerprint="a", version=len(turns) + 1,
            turn=len(turns), created_at=now, updated_at=now, metadata=metadata)).inserted_primary_key[0]
        count = 0
        for k, turn in enumerate([{"state": [], "written": [], "window": []}, *turns]):
            count += len(turn["written"])
            conn.execute(insert(SNAPSHOTS).values(
                session_pk=pk, turn=k, created_at=now, written_count=count, tensor_count=len(turn["state"]),
                state_bytes=sum(len(b.data) for b in turn["state"]), window_count=len(turn["window"])))
            for i, b in enumerate(turn["state"]):
                conn.execute(insert(TENSORS).values(
                    session_pk=pk, turn=k, position=i, name=b.name, dtype=b.dtype, shape=list(b.shape),
                    data=b.data if not turn.get("damaged") else bytes(len(b.data)), checksum=sha256_hex(b.data)))
            for w in turn["written"]:
                conn.execute(insert(WRITTEN).values(session_pk=pk, turn=k, message_index=w.index, role=w.role,
                                                    digest=w.digest, tokens=w.tokens))
            for i, w in enumerate(turn["window"]):
                conn.execute(insert(WINDOW).values(session_pk=pk, turn=k, position=i, message_index=w.index,
                                                   role=w.role, content=w.content, tokens=w.tokens))


@pytest.mark.parametrize("via", ["upgrade", "async-store"])
def test_upgrade_to_digests_seals_what_verifies_and_reports_the_rest(fresh_url, monkeypatch, via):
    """Existing rows are backfilled at upgrade: a turn that passes schema 1's checks is sealed (and the record
    summary a turn needs is filled in); one that fails stays unsealed and raises CorruptSessionError on load.
    The same step runs when an async store (aiosqlite / asyncpg) opens the database."""
    from deltamem_agents.store import CorruptSessionError, RecordSummary
    from deltamem_agents.store.connect import make_engine

    from ._helpers import blob, window, written

    _schema1_database(fresh_url, monkeypatch)
    engine = make_engine(fresh_url)
    turn = lambda k, idx, **kw: {"state": [blob(seed=k), blob("layer1", seed=-k)], "written": written(idx),  # noqa: E731
                                 "window": window(idx), **kw}
    _write_schema1_session(engine, "old", "good", [turn(1, 0), turn(2, 1)], {"owner": "ada", "n": 10**20})
    _write_schema1_session(engine, "old", "damaged", [turn(1, 0), turn(2, 1, damaged=True)], {})
    _write_schema1_session(engine, "old", "gapped", [turn(1, 0), turn(2, 2)], {})  # an import of a gapped file
    engine.dispose()

    if via == "upgrade":
        assert upgrade(fresh_url) == ["0002_digests"]
    else:
        import asyncio

        from deltamem_agents.store import open_async_store

        async def open_and_close():
            store = await open_async_store(fresh_url)
            await store.close()

        asyncio.run(open_and_close())
    assert current_version(fresh_url) == 2
    with SQLSessionStore(fresh_url) as store:
        for k in (0, 1, 2):
            data = store.load("good", namespace="old", turn=k, full_record=True)
            assert data.written == written(*range(k)) and data.record == RecordSummary.of(data.written)
        info = store.get("good", namespace="old")
        store.commit("good", namespace="old", expected_version=info.version, state=[], written=written(2),
                     window=[])
        assert store.load("good", namespace="old").record.count == 3

        for sid in ("damaged", "gapped"):
            with pytest.raises(CorruptSessionError, match="not sealed") as caught:
                store.load(sid, namespace="old")
            assert (caught.value.session_id, caught.value.turn) == (sid, 2)
            info = store.get(sid, namespace="old")
            with pytest.raises(CorruptSessionError):  # nothing on top of the damaged turn
                store.commit(sid, namespace="old", expected_version=info.version, state=[], written=written(1),
                             window=[])
            assert store.load(sid, namespace="old", turn=1, full_record=True).record.count == 1
            store.rollback(sid, namespace="old", turn=1)  # the way on: back to the last sound turn
            store.commit(sid, namespace="old", expected_version=info.version + 1, state=[], written=written(1),
                         window=[])
            assert store.load(sid, namespace="old", full_record=True).written == written(0, 1)
