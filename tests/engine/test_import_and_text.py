"""Issue 13, on SQLite and PostgreSQL: import puts the session in the caller's namespace, refuses damaged files,
gapped records and invalid windows; message text a store cannot keep is refused before the model runs; a
damaged stored state is refused before a turn commits on top of it."""

from __future__ import annotations

import json
import os
import uuid

import pytest
import torch
from engine_helpers import conversation
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sqlalchemy import update

from deltamem_agents.engine import InvalidMessageError, PortableFormatError
from deltamem_agents.engine.portable import integrity_digest
from deltamem_agents.store import CorruptSessionError, SQLSessionStore

BACKENDS = ("sqlite", "postgresql")


def _postgres_url() -> str:
    url = os.environ.get("DELTAMEM_TEST_POSTGRES_URL", "").strip()
    if url:
        return url
    if os.environ.get("CI"):
        pytest.fail("CI must run the PostgreSQL cases: set $DELTAMEM_TEST_POSTGRES_URL")
    pytest.skip("PostgreSQL cases need $DELTAMEM_TEST_POSTGRES_URL")


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path) -> str:
    return str(tmp_path / "sessions.db") if request.param == "sqlite" else _postgres_url()


@pytest.fixture
def namespaces():
    """Namespaces of this test only (so a shared PostgreSQL database stays usable); purged afterwards."""
    made: list[tuple[str, str]] = []

    def new(label: str) -> str:
        ns = f"{label}-{uuid.uuid4().hex[:8]}"
        made.append(ns)
        return ns

    new.made = made
    return new


@pytest.fixture
def engines(make_engine, url, namespaces):
    """``engines(namespace)`` → an engine on its own store of this backend (closed and purged afterwards)."""
    stores = []

    def make(namespace: str, **kwargs):
        store = SQLSessionStore(url)
        stores.append(store)
        return make_engine(store=store, namespace=namespace, **kwargs)

    yield make
    for store in stores:
        for ns in namespaces.made:
            for info in store.list_sessions(namespace=ns, limit=1000):
                store.delete(info.session_id, namespace=ns)
        store.close()


def _exported(engines, namespaces, tmp_path):
    globex = engines(namespaces("globex"))
    globex.write("s", conversation(2))
    return globex, globex.export_session("s", tmp_path / "s.safetensors")


def _rewrite(path, edit) -> None:
    """Rewrite an export's metadata with ``edit(meta)``, recomputing its integrity digest (a well-formed file
    whose content is wrong, as a buggy or hostile exporter would write it)."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["deltamem"])
    tensors = load_file(str(path))
    edit(meta)
    meta["integrity"] = {"sha256": integrity_digest(meta, tensors)}
    save_file(tensors, str(path), metadata={"deltamem": json.dumps(meta)})


# ---------------------------------------------------------------------------------------------- namespaces
def test_import_lands_in_the_callers_namespace(engines, namespaces, tmp_path):
    globex, path = _exported(engines, namespaces, tmp_path)
    acme_ns = namespaces("acme")
    acme = engines(acme_ns)
    info = acme.import_session(path, "t")
    assert info.namespace == acme_ns
    assert acme.store.exists("t", namespace=acme_ns)
    assert not acme.store.exists("t", namespace=globex.namespace)  # never in the file's namespace
    assert acme.session_state("t").equal(globex.session_state("s"))
    assert acme.write("t", conversation(2)).written_messages == 0  # the record travelled
    other_ns = namespaces("other")
    assert acme.import_session(path, "t", namespace=other_ns).namespace == other_ns


def test_cli_import_honours_namespace(engines, namespaces, tmp_path, url, monkeypatch, capsys, tiny_dm, tokenizer):
    from deltamem_agents.cli import main
    from deltamem_agents.engine import MemoryEngine, cli_commands

    _, path = _exported(engines, namespaces, tmp_path)
    acme_ns = namespaces("acme")
    made = []

    def tiny_engine(args, **kwargs):
        made.append(MemoryEngine((tiny_dm, tokenizer), store=args.store, namespace=args.namespace, **kwargs))
        return made[-1]

    monkeypatch.setattr(cli_commands, "_engine", tiny_engine)
    assert main(["sessions", "import", str(path), "--session", "t", "--store", url, "--namespace", acme_ns,
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["namespace"] == acme_ns
    with SQLSessionStore(url) as store:
        assert store.exists("t", namespace=acme_ns)
        store.delete("t", namespace=acme_ns)


# ---------------------------------------------------------------------------------------------- damaged files
def test_a_flipped_state_byte_is_refused(engines, namespaces, tmp_path):
    _, path = _exported(engines, namespaces, tmp_path)
    raw = bytearray(path.read_bytes())
    data_start = 8 + int.from_bytes(raw[:8], "little")
    raw[data_start] ^= 0x01  # the lowest mantissa bit of the first float: still finite, just wrong
    path.write_bytes(bytes(raw))
    acme_ns = namespaces("acme")
    acme = engines(acme_ns)
    with pytest.raises(PortableFormatError, match="integrity"):
        acme.import_session(path, "t")
    assert not acme.store.exists("t", namespace=acme_ns)


def test_edited_metadata_is_refused(engines, namespaces, tmp_path):
    _, path = _exported(engines, namespaces, tmp_path)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["deltamem"])
    tensors = load_file(str(path))
    meta["window"][0]["content"] = "forged"
    save_file(tensors, str(path), metadata={"deltamem": json.dumps(meta)})  # digest left as exported
    with pytest.raises(PortableFormatError, match="integrity"):
        engines(namespaces("acme")).import_session(path, "t")


def test_format_1_export_is_refused_with_a_clear_message(engines, namespaces, tmp_path):
    _, path = _exported(engines, namespaces, tmp_path)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["deltamem"])
    meta["format_version"] = 1
    del meta["integrity"]
    save_file(load_file(str(path)), str(path), metadata={"deltamem": json.dumps(meta)})
    with pytest.raises(PortableFormatError, match="integrity check.*[Ee]xport the session again"):
        engines(namespaces("acme")).import_session(path, "t")


# ---------------------------------------------------------------------------------------------- content
@pytest.mark.parametrize(
    "renumbered", [lambda i: i + (i > 0), lambda i: max(0, i - 1), lambda i: i + 1], ids=["gap", "repeat", "offset"]
)
def test_a_record_that_is_not_numbered_0_to_n_is_refused(engines, namespaces, tmp_path, renumbered):
    _, path = _exported(engines, namespaces, tmp_path)

    def renumber(meta):
        for i, w in enumerate(meta["written"]):
            w["index"] = renumbered(i)

    _rewrite(path, renumber)
    acme_ns = namespaces("acme")
    acme = engines(acme_ns)
    with pytest.raises(PortableFormatError, match="numbered 0, 1, 2"):
        acme.import_session(path, "t")
    assert not acme.store.exists("t", namespace=acme_ns)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"content": "a\x00b"}, "NUL"),
        ({"content": "lone \ud800 surrogate"}, "surrogate"),
        ({"role": "wizard"}, "invalid role"),
        ({"role": "user", "content": "   "}, "empty user message"),
        ({"content": ["not", "text"]}, "no text content"),
        ({"index": 99}, "refer to written messages"),
        ({"tokens": -1}, "token count"),
    ],
    ids=["nul", "surrogate", "role", "empty", "not-text", "index", "tokens"],
)
def test_an_invalid_window_is_refused(engines, namespaces, tmp_path, change, match):
    _, path = _exported(engines, namespaces, tmp_path)
    _rewrite(path, lambda meta: meta["window"][-1].update(change))
    acme_ns = namespaces("acme")
    acme = engines(acme_ns)
    with pytest.raises(PortableFormatError, match=match):
        acme.import_session(path, "t")
    assert not acme.store.exists("t", namespace=acme_ns)


# ---------------------------------------------------------------------------------------------- message text
BAD_MESSAGES = {
    "nul-content": [{"role": "user", "content": "before\x00after"}],
    "surrogate-content": [{"role": "user", "content": "half a pair: \udc00"}],
    "nul-in-parts": [{"role": "user", "content": [{"type": "text", "text": "a\x00"}]}],
    "nul-in-name": [{"role": "user", "content": "hi", "name": "bo\x00b"}],
    "nul-in-tool-call": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "", "tool_calls": [
                             {"type": "function", "function": {"name": "f", "arguments": "{\"x\": \"\x00\"}"}}]}],
    "nul-in-history": [{"role": "system", "content": "sys\x00"}, {"role": "user", "content": "hi"}],
}


@pytest.mark.parametrize("case", list(BAD_MESSAGES))
def test_text_a_store_cannot_keep_is_refused_before_the_model_runs(engines, namespaces, case, monkeypatch):
    """Before: fine on SQLite, psycopg.DataError at commit on PostgreSQL after the reply was generated."""
    ns = namespaces("text")
    eng = engines(ns, mode="online")
    ran = []
    real = eng.runner.forward
    monkeypatch.setattr(eng.runner, "forward", lambda *a, **k: ran.append(1) or real(*a, **k))
    with pytest.raises(InvalidMessageError, match="NUL|surrogate"):
        eng.chat("s", BAD_MESSAGES[case], max_new_tokens=2)
    with pytest.raises(InvalidMessageError, match="NUL|surrogate"):
        eng.write("s", BAD_MESSAGES[case])
    assert ran == [] and not eng.store.exists("s", namespace=ns)
    eng.chat("s", [{"role": "user", "content": "plain text is fine: ü 🎉"}], max_new_tokens=2)
    assert ran and eng.get_session("s").turn == 1


# ---------------------------------------------------------------------------------------------- stored damage
def test_a_forged_state_dtype_stops_the_turn(engines, namespaces):
    """Before: float32 → int32 (same byte size) loaded silently and the next turn committed on top of it."""
    from deltamem_agents.store.ops import SESSIONS, TENSORS

    ns = namespaces("forged")
    eng = engines(ns)
    eng.write("s", conversation(1))
    info = eng.get_session("s")
    store = eng.store
    with store.engine.begin() as conn:
        pk = conn.execute(SESSIONS.select().where(SESSIONS.c.namespace == ns)).one().id
        conn.execute(update(TENSORS).where(TENSORS.c.session_pk == pk, TENSORS.c.turn == info.turn,
                                           TENSORS.c.dtype == "float32").values(dtype="int32"))
    with pytest.raises(CorruptSessionError, match="tensor table") as caught:
        eng.chat("s", conversation(2), max_new_tokens=2)
    assert (caught.value.namespace, caught.value.session_id, caught.value.turn) == (ns, "s", info.turn)
    assert eng.get_session("s").version == info.version  # nothing committed on top
    with pytest.raises(CorruptSessionError):
        eng.export_session("s", "/dev/null")
    assert torch.equal(eng.session_state("s", turn=0).to_tensors()["memory"],
                       eng.model.new_state(1).to_tensors()["memory"])
