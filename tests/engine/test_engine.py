"""MemoryEngine behaviour on a tiny random model (fast), on the in-memory store and on SQLite."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from engine_helpers import conversation, make_tiny_dm

from deltamem_agents.engine import (
    FingerprintMismatchError,
    HistoryConflictError,
    InvalidMessageError,
    InvalidStateError,
    PortableFormatError,
    SessionNotFoundError,
)
from deltamem_agents.engine.serialization import state_to_blobs
from deltamem_agents.store.base import CorruptStateError, TensorBlob


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    if request.param == "memory":
        from deltamem_agents.store.memory import InMemorySessionStore

        yield InMemorySessionStore()
    else:
        from deltamem_agents.store import open_store

        s = open_store(f"sqlite:///{tmp_path}/sessions.db")
        yield s
        s.close()


def _fold(engine, msgs):
    """The documented write rule by hand: each message's template tokens, one forward call each, from zero."""
    from deltamem_agents.engine.messages import normalize_messages

    state = engine.model.new_state(1)
    for m in normalize_messages(msgs):
        _, state = engine.runner.forward(state, engine.renderer.message_ids(m), writes=True, want_logits=False)
    return state


def _logits(engine, state, text="What is my name?"):
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    logits, _ = engine.runner.forward(state, ids, writes=False)
    return logits


def test_store_roundtrip_gives_bitwise_state_and_logits(make_engine, store):
    eng = make_engine(store)
    msgs = conversation(2)
    eng.write("s", msgs)
    loaded = eng.session_state("s")
    direct = _fold(eng, msgs)
    assert loaded.equal(direct)
    assert torch.equal(_logits(eng, loaded), _logits(eng, direct))
    assert not torch.equal(_logits(eng, loaded), _logits(eng, eng.model.new_state(1)))  # the state matters


def test_idempotent_resend_writes_nothing(make_engine, store):
    eng = make_engine(store)
    msgs = conversation(2)
    first = eng.write("s", msgs)
    assert first.written_messages == len(msgs) and first.turn == 1
    before = eng.session_state("s")
    again = eng.write("s", msgs)
    assert again.written_messages == 0 and again.turn == 1
    assert eng.session_state("s").equal(before)
    # a chat that resends the history writes only the new message and the reply
    r = eng.chat("s", msgs + [{"role": "user", "content": "And my city?"}], max_new_tokens=4)
    assert r.written_messages == 2 and not r.replayed
    # resending that turn with the reply writes nothing more
    turn = eng.get_session("s").turn
    state = eng.session_state("s")
    w = eng.write("s", msgs + [{"role": "user", "content": "And my city?"}, {"role": "assistant", "content": r.text}])
    assert w.written_messages == 0 and eng.get_session("s").turn == turn and eng.session_state("s").equal(state)


def test_write_only_equals_generate(make_engine):
    eng = make_engine()
    user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Remember 4417."}]
    r = eng.chat("gen", user, max_new_tokens=6)
    eng.write("wr", user + [{"role": "assistant", "content": r.text}])
    assert eng.session_state("gen").equal(eng.session_state("wr"))
    assert eng.session_state("gen").equal(_fold(eng, user + [{"role": "assistant", "content": r.text}]))
    # and split differently: one turn at a time vs all at once
    eng.write("one", user[:1])
    eng.write("one", user)
    eng.write("one", user + [{"role": "assistant", "content": r.text}])
    assert eng.session_state("one").equal(eng.session_state("gen"))


@pytest.mark.parametrize("write_mode", ["tsw", "ssw"])
def test_divergence_rolls_back_and_replays(make_engine, write_mode):
    from engine_helpers import make_tiny_dm

    eng = make_engine(dm=make_tiny_dm(write_mode))
    msgs = conversation(3)
    for k in range(2, len(msgs) + 1, 2):  # one turn per exchange
        eng.write("s", msgs[:k])
    turn_before = eng.get_session("s").turn
    edited = [dict(m) for m in msgs]
    edited[3]["content"] = "I live in Porto."
    version, state = eng.get_session("s").version, eng.session_state("s")
    with pytest.raises(HistoryConflictError) as conflict:  # by default a diverging history is refused
        eng.write("s", edited)
    written = eng.stats("s").written_messages
    assert conflict.value.common_prefix == 3 and conflict.value.missing == written - 3
    assert conflict.value.session_id == "s" and conflict.value.version == eng.get_session("s").version
    assert eng.get_session("s").version == version and eng.session_state("s").equal(state)
    w = eng.write("s", edited, on_divergence="rollback")
    assert w.replayed and w.rolled_back_to is not None and w.rolled_back_to < turn_before
    eng.write("fresh", edited)
    assert eng.session_state("s").equal(eng.session_state("fresh"))
    # a regenerate (history cut before the last answer) rolls back too, and the chat result says so
    with pytest.raises(HistoryConflictError):
        eng.chat("s", edited[:-1], max_new_tokens=3)
    r = eng.chat("s", edited[:-1], max_new_tokens=3, on_divergence="rollback")
    assert r.replayed and r.rolled_back_to is not None


def test_modes_and_usage(make_engine):
    eng = make_engine(window_tokens=40)
    msgs = conversation(3) + [{"role": "user", "content": "What is my name?"}]
    results = {m: eng.chat(f"s-{m}", msgs, mode=m, max_new_tokens=5) for m in ("windowed", "online", "state-only")}
    text = eng.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    full = eng.tokenizer(text, add_special_tokens=False)["input_ids"]
    for mode, r in results.items():
        u = r.usage
        assert r.mode == mode and u.completion_tokens <= 5 and u.written_tokens > 0
        assert u.full_context_tokens == len(full), mode
    assert results["online"].usage.prompt_tokens == len(full)
    assert results["state-only"].usage.prompt_tokens < results["windowed"].usage.prompt_tokens < len(full)
    # windowed and state-only write the same fold of messages + reply; online writes with context
    for mode in ("windowed", "state-only"):
        reply = {"role": "assistant", "content": results[mode].text}
        assert eng.session_state(f"s-{mode}").equal(_fold(eng, msgs + [reply])), mode
    reply = {"role": "assistant", "content": results["online"].text}
    assert not eng.session_state("s-online").equal(_fold(eng, msgs + [reply]))


def test_online_chat_writes_the_reply_as_write_does_in_the_same_call(make_engine):
    """``online``: chat() leaves bitwise the state that write() of the same messages plus the reply leaves, when
    both write them in one call (the same forward calls on the same inputs; the generated tokens are cropped
    from the KV cache before the reply is written).

    Not asserted, because the engine does not promise it: equality with a write split differently over calls.
    Online mode runs the already-written history with writes off when a call starts, so its state depends on
    the split (module docs of ``engine.py``); on a 2-layer model the difference is only rounding (the last
    layer's KV feeds no write), which made an earlier version of this test pass or fail with the CPU's kernels.
    """
    eng = make_engine(mode="online", dm=make_tiny_dm(layers=4))  # deep enough that history KV feeds writes
    msgs = conversation(1) + [{"role": "user", "content": "Say hi."}]
    r = eng.chat("gen", msgs, max_new_tokens=5)
    assert r.text and r.usage.completion_tokens == 5
    eng.write("one", msgs + [{"role": "assistant", "content": r.text}])
    assert eng.session_state("gen").equal(eng.session_state("one"))


def test_stream_matches_chat_and_stop_strings(make_engine):
    eng = make_engine()
    msgs = [{"role": "user", "content": "Tell me a story."}]
    full = eng.chat("a", msgs, max_new_tokens=12)
    chunks = list(eng.stream("b", msgs, max_new_tokens=12))
    assert "".join(c.text for c in chunks) == full.text
    last = chunks[-1]
    assert last.finish_reason == full.finish_reason == "length" and last.usage == full.usage
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert eng.session_state("a").equal(eng.session_state("b"))
    # a stop string taken from the greedy text cuts it there
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    cut = eng.chat("c", msgs, max_new_tokens=12, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    streamed = "".join(c.text for c in eng.stream("d", msgs, max_new_tokens=12, stop=stop))
    assert streamed == cut.text
    # a stream closed early commits nothing
    it = eng.stream("e", msgs, max_new_tokens=12)
    next(it)
    it.close()
    assert not eng.store.exists("e")  # a new session is created only by its first commit


def test_seeded_sampling_is_reproducible(make_engine):
    eng = make_engine()
    kw = dict(max_new_tokens=8, temperature=0.9, top_p=0.9, top_k=50, seed=3)
    a = eng.chat("a", "hello", **kw)
    b = eng.chat("b", "hello", **kw)
    assert a.text == b.text


def test_append_style_and_window(make_engine):
    eng = make_engine(window_tokens=30)
    eng.chat("s", [{"role": "system", "content": "Be brief."}], max_new_tokens=2)
    for q in ("My name is Ada.", "I live in Lisbon.", "My cat is Pixel."):
        r = eng.chat("s", q, max_new_tokens=3, history="append")
    stats = eng.stats("s")
    assert stats.written_messages == 8 and r.turn == 4
    window = eng.store.load("s").window
    assert window[0].index == 0 and window[0].role == "system"  # pinned
    assert sum(w.tokens for w in window[1:-1]) <= 30 and window[-1].index == 7


def test_session_operations(make_engine, store, tmp_path):
    eng = make_engine(store)
    msgs = conversation(3)
    for k in range(2, len(msgs) + 1, 2):
        eng.write("s", msgs[:k])
    info = eng.get_session("s")
    assert info.turn == 3 and [s.session_id for s in eng.list_sessions()] == ["s"]
    turn1 = eng.session_state("s", turn=1)
    f = eng.fork("s", "f", turn=1)
    assert f.turn == 1 and eng.session_state("f").equal(turn1)
    eng.rollback("s", 1)
    assert eng.session_state("s").equal(turn1) and eng.get_session("s").turn == 1
    eng.write("s", msgs)  # the rolled-back messages are written again
    assert eng.session_state("s").equal(_fold(eng, msgs))
    eng.reset("s")
    assert eng.session_state("s").equal(eng.model.new_state(1)) and eng.stats("s").written_messages == 0
    eng.delete("s")
    with pytest.raises(SessionNotFoundError):
        eng.get_session("s")
    with pytest.raises(SessionNotFoundError):
        eng.write("nope", msgs, create_if_missing=False)


def test_export_import(make_engine, tmp_path):
    eng = make_engine()
    msgs = conversation(2)
    eng.write("s", msgs)
    path = eng.export_session("s", tmp_path / "s.safetensors")
    other = make_engine()
    info = other.import_session(path, "t")
    assert info.turn == 1
    assert other.session_state("t").equal(eng.session_state("s"))
    assert torch.equal(_logits(other, other.session_state("t")), _logits(eng, eng.session_state("s")))
    assert other.write("t", msgs).written_messages == 0  # the record travelled: nothing is written twice
    assert [w.content for w in other.store.load("t").window] == [w.content for w in eng.store.load("s").window]
    # a different adapter refuses the file and creates nothing
    from engine_helpers import make_tiny_dm

    foreign = make_engine(dm=make_tiny_dm(seed=5))
    with pytest.raises(FingerprintMismatchError):
        foreign.import_session(path, "t")
    assert not foreign.store.exists("t")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a file")
    with pytest.raises(PortableFormatError):
        other.import_session(bad, "u")


def test_nan_state_import_refused(make_engine, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    eng = make_engine()
    eng.write("s", conversation(1))
    path = eng.export_session("s", tmp_path / "s.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["memory"][0, 0, 0, 0, 0] = float("inf")
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(InvalidStateError):
        eng.import_session(path, "t")
    assert not eng.store.exists("t")


def test_bad_inputs_change_nothing(make_engine):
    eng = make_engine(max_message_tokens=40)
    msgs = conversation(1)
    eng.write("s", msgs)
    version, state = eng.get_session("s").version, eng.session_state("s")
    bad_calls = [
        [],
        msgs + [{"role": "user", "content": ""}],
        msgs + [{"role": "robot", "content": "x"}],
        msgs + [{"role": "user", "content": "word " * 100}],
    ]
    for bad in bad_calls:
        with pytest.raises(InvalidMessageError):
            eng.chat("s", bad, max_new_tokens=2)
        with pytest.raises(InvalidMessageError):
            eng.write("s", bad)
    assert eng.get_session("s").version == version and eng.session_state("s").equal(state)
    with pytest.raises(InvalidMessageError):
        eng.chat("never", [{"role": "user", "content": ""}], max_new_tokens=2)
    assert not eng.store.exists("never")


def test_fingerprint_mismatch_and_corrupt_state(make_engine):
    from engine_helpers import make_tiny_dm

    from deltamem_agents.store.memory import InMemorySessionStore

    store = InMemorySessionStore()
    eng = make_engine(store)
    eng.write("s", conversation(1))
    version = store.get("s").version
    other = make_engine(store, dm=make_tiny_dm(seed=9))
    with pytest.raises(FingerprintMismatchError):
        other.chat("s", conversation(1) + [{"role": "user", "content": "hi"}], max_new_tokens=2)
    with pytest.raises(FingerprintMismatchError):
        other.session_state("s")
    assert store.get("s").version == version
    # a NaN state in the store is refused before anything runs
    state = eng.session_state("s")
    state.memory[0][0, 0, 0, 0] = float("nan")
    store.commit("s", expected_version=version, state=state_to_blobs(state), written=[], window=[])
    version = store.get("s").version
    with pytest.raises(InvalidStateError):
        eng.chat("s", "hi", max_new_tokens=2)
    assert store.get("s").version == version
    # corrupt bytes surface the store's error
    class Corrupting(InMemorySessionStore):
        def load(self, *a, **k):
            data = super().load(*a, **k)
            blob = data.state[0]
            broken = TensorBlob(blob.name, blob.dtype, blob.shape, blob.data[:-4], blob.checksum)
            from dataclasses import replace

            return replace(data, state=[broken])

    cstore = Corrupting()
    ceng = make_engine(cstore)
    cstore.create("c", model_fingerprint=ceng.fingerprints["model"], adapter_fingerprint=ceng.fingerprints["adapter"])
    cstore.commit("c", expected_version=1, state=state_to_blobs(eng.model.new_state(1)), written=[], window=[])
    with pytest.raises(CorruptStateError):
        ceng.chat("c", "hi", max_new_tokens=2)


def test_concurrent_update_is_retried(make_engine):
    """Another writer commits between our load and our commit: the engine reloads and writes again."""
    from deltamem_agents.store.memory import InMemorySessionStore

    class Racing(InMemorySessionStore):
        raced = False

        def commit(self, session_id, **kw):
            if not self.raced and session_id == "s":
                self.raced = True
                # another process commits an empty turn first: the version moves under our feet
                super().commit(session_id, expected_version=kw["expected_version"], state=[], written=[], window=[])
            return super().commit(session_id, **kw)

    store = Racing()
    eng = make_engine(store)
    msgs = conversation(1)
    w = eng.write("s", msgs)
    assert store.raced and w.written_messages == len(msgs)
    assert eng.session_state("s").equal(_fold(eng, msgs))


def _sessions():
    return {f"s{i}": conversation(1 + i % 3) + [{"role": "user", "content": f"Question {i}?"}] for i in range(4)}


def test_threads_give_states_equal_to_alone(make_engine):
    sessions = _sessions()
    alone = make_engine()
    for sid, msgs in sessions.items():
        alone.chat(sid, msgs, max_new_tokens=6)
    together = make_engine()
    errors = []

    def run(sid, msgs):
        try:
            together.chat(sid, msgs, max_new_tokens=6)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=item) for item in sessions.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for sid in sessions:
        assert together.session_state(sid).equal(alone.session_state(sid)), sid
        assert together.store.load(sid).window == alone.store.load(sid).window


def test_asyncio_gives_states_equal_to_alone(make_engine):
    sessions = _sessions()
    alone = make_engine()
    texts = {sid: alone.chat(sid, msgs, max_new_tokens=6).text for sid, msgs in sessions.items()}
    together = make_engine()

    async def stream_one(sid, msgs):
        return "".join([c.text async for c in together.astream(sid, msgs, max_new_tokens=6)])

    async def main():
        streamed = await asyncio.gather(*(stream_one(s, m) for s, m in list(sessions.items())[:2]))
        chatted = await asyncio.gather(*(together.achat(s, m, max_new_tokens=6) for s, m in list(sessions.items())[2:]))
        return list(streamed) + [r.text for r in chatted]

    out = asyncio.run(main())
    assert out == list(texts.values())
    for sid in sessions:
        assert together.session_state(sid).equal(alone.session_state(sid)), sid


def test_same_session_requests_are_serialised(make_engine):
    eng = make_engine()
    msgs = conversation(1)
    threads = [threading.Thread(target=eng.write, args=("s", msgs)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert eng.get_session("s").turn == 1 and eng.stats("s").written_messages == len(msgs)
