"""``online`` mode (the default): the hot KV cache as short-term memory, the state as long-term memory.

What is asserted, and why it holds:

* A session whose cache stayed hot runs exactly the forward calls of one ``write()`` of the whole conversation
  in a fresh session (the template head, then one call per message continuing one KV cache; the generation's
  tokens are cropped before the reply is written), so its state is **bitwise** that state.
* A turn on a hot cache runs only its new tokens; a re-prefill happens once per block, never per turn.
* A cache is reused only for the state it was committed with: rollback, reset, delete, fork, import, a replay,
  a cancelled stream, a lost race all lead to a re-prefill (``kv_cache`` says which happened), never to a stale
  cache. Files on disk load only when they match the stored session and their checksum; anything else is a
  miss.
"""

from __future__ import annotations

import pytest
from engine_helpers import conversation, make_tiny_dm

from deltamem_agents.engine import ContextLengthError, InvalidOptionError


@pytest.fixture(scope="module")
def deep_dm():
    # 4 layers: deep enough that the KV of earlier messages feeds later writes (a 2-layer model hides it)
    return make_tiny_dm(layers=4, seed=3)


@pytest.fixture
def online(make_engine, deep_dm):
    def make(**kwargs):
        kwargs.setdefault("mode", "online")
        kwargs.setdefault("dm", deep_dm)
        return make_engine(**kwargs)

    return make


class TokenCounter:
    """Wraps ``runner.forward`` to count the tokens each call runs (the test is about our engine's logic)."""

    def __init__(self, engine):
        self.tokens = 0
        inner = engine.runner.forward

        def counted(state, ids, **kw):
            self.tokens += len(ids)
            return inner(state, ids, **kw)

        engine.runner.forward = counted

    def take(self) -> int:
        n, self.tokens = self.tokens, 0
        return n


def _chat_turns(eng, sid, n, *, max_new_tokens=4, history="full"):
    msgs = conversation(1)
    results = []
    for i in range(n):
        msgs = msgs + [{"role": "user", "content": f"Question number {i}: what did I say?"}]
        sent = msgs if history == "full" or i == 0 else msgs[-1:]
        r = eng.chat(sid, sent, max_new_tokens=max_new_tokens, history=history)
        msgs = msgs + [{"role": "assistant", "content": r.text}]
        results.append(r)
    return msgs, results


def test_default_mode_is_online(make_engine):
    from deltamem_agents.engine import MODES, MemoryEngine

    assert MODES[0] == "online"
    import inspect

    assert inspect.signature(MemoryEngine).parameters["mode"].default == "online"


def test_hot_turns_equal_one_write_of_the_whole_conversation(online):
    eng = online()
    msgs, results = _chat_turns(eng, "hot", 4)
    assert [r.kv_cache for r in results] == ["new", "hot", "hot", "hot"]
    fresh = online()
    fresh.write("once", msgs)
    assert eng.session_state("hot").equal(fresh.session_state("once"))
    # append-style clients (only the new message) get the same state
    eng2 = online()
    _, results2 = _chat_turns(eng2, "append", 4, history="append")
    assert [r.text for r in results2] == [r.text for r in results]
    assert eng2.session_state("append").equal(eng.session_state("hot"))


def test_sliding_window_layers_rewind_after_generation(online):
    """Gemma 3's local layers keep only their last ``window - 1`` columns, so once a conversation is longer than
    the window the generated tokens cannot be cropped off them (transformers refuses); the engine rewinds those
    layers to what they held before generation instead. Same property as for full attention: the hot turns'
    state is bitwise one write of the whole conversation."""
    dm = make_tiny_dm(layers=4, seed=3, arch="gemma3")
    eng = online(dm=dm)
    msgs, results = _chat_turns(eng, "hot", 3, max_new_tokens=20)
    assert [r.kv_cache for r in results] == ["new", "hot", "hot"]
    assert results[-1].usage.prompt_tokens > 16 and all(r.usage.completion_tokens > 0 for r in results)
    fresh = online(dm=dm)
    fresh.write("once", msgs)
    assert eng.session_state("hot").equal(fresh.session_state("once"))


def test_a_hot_turn_runs_only_its_new_tokens(online):
    eng = online()
    counter = TokenCounter(eng)
    msgs = conversation(2) + [{"role": "user", "content": "First question?"}]
    r1 = eng.chat("s", msgs, max_new_tokens=4)
    counter.take()
    msgs += [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "Second question, please?"}]
    r2 = eng.chat("s", msgs, max_new_tokens=4)
    run = counter.take()
    new_user = len(eng.renderer.message_ids(eng._validate([msgs[-1]])[0][0]))
    header = len(eng.renderer.generation_header_ids)
    reply = r2.usage.written_tokens - new_user
    # the new message, the generation header, each generated token but the last, then the reply as a message
    assert run == new_user + header + (r2.usage.completion_tokens - 1 + (r2.finish_reason == "stop")) + reply
    assert r2.kv_cache == "hot"
    assert r2.usage.cached_tokens == r2.usage.prompt_tokens - new_user - header > 0
    stats = eng.kv_cache_stats()
    assert stats.hits == 1 and stats.sessions == 1 and stats.bytes > 0


def test_resending_written_history_writes_nothing_and_keeps_the_cache(online):
    eng = online()
    msgs, _ = _chat_turns(eng, "s", 2)
    before = eng.session_state("s")
    w = eng.write("s", msgs)
    assert w.written_messages == 0 and eng.session_state("s").equal(before)
    r = eng.chat("s", msgs + [{"role": "user", "content": "And now?"}], max_new_tokens=3)
    assert r.kv_cache == "hot" and not r.replayed


def test_window_slides_in_blocks_not_every_turn(online):
    eng = online(kv_tokens=220, kv_retain=0.5)
    msgs = conversation(1)
    kinds, prompts = [], []
    for i in range(14):
        msgs = msgs + [{"role": "user", "content": f"Here is note {i}: the shipment moved to dock {i}."}]
        r = eng.chat("s", msgs, max_new_tokens=4)
        msgs = msgs + [{"role": "assistant", "content": r.text}]
        kinds.append(r.kv_cache)
        prompts.append(r.usage.prompt_tokens)
    slides = [i for i, k in enumerate(kinds) if k == "slid"]
    assert slides, kinds
    assert all(b - a >= 2 for a, b in zip(slides, slides[1:], strict=False)), kinds  # never two turns in a row
    assert all(k in ("new", "hot", "slid") for k in kinds)
    assert max(p + 4 for p in prompts) <= 220
    # the pinned system message stays in the prompt after a slide
    window = eng.store.load("s").window
    assert window[0].index == 0 and window[0].role == "system"
    assert eng.kv_cache_stats().slides == len(slides)


def test_cache_is_dropped_whenever_the_state_is_not_the_sessions_current_one(online, tmp_path):
    eng = online()
    msgs, _ = _chat_turns(eng, "s", 3)
    nxt = msgs + [{"role": "user", "content": "Next?"}]

    eng.rollback("s", 1)
    r = eng.chat("s", nxt, max_new_tokens=3)  # the messages after turn 1 are written again, on a rebuilt context
    assert not r.replayed and r.kv_cache == "rebuilt" and r.written_messages == len(nxt) - 5 + 1  # turn 1 holds 5

    # an edited earlier message: replay from the snapshot before it (turn 1), from text
    edited = [dict(m) for m in nxt]
    edited[6]["content"] = "An edited reply."
    r = eng.chat("s", edited, max_new_tokens=3, on_divergence="rollback")
    assert r.replayed and r.rolled_back_to == 1 and r.kv_cache == "rebuilt"
    # …and an edit of the very first exchange replays from nothing: no context to prefill
    first = [dict(m) for m in edited]
    first[1]["content"] = "My name is Grace."
    r = eng.chat("s", first, max_new_tokens=3, on_divergence="rollback")
    assert r.replayed and r.rolled_back_to == 0 and r.kv_cache == "new"
    edited = first

    # fork: the copy re-prefills, the source stays hot
    eng.fork("s", "copy")
    after = edited + [{"role": "assistant", "content": r.text}, {"role": "user", "content": "More?"}]
    assert eng.chat("copy", after, max_new_tokens=2).kv_cache == "rebuilt"
    assert eng.chat("s", after, max_new_tokens=2).kv_cache == "hot"

    eng.reset("s")
    r = eng.chat("s", nxt[:2], max_new_tokens=2)
    assert r.kv_cache == "new"
    reply = {"role": "assistant", "content": r.text}

    eng.delete("copy")
    assert eng.chat("copy", nxt[:2], max_new_tokens=2).kv_cache == "new"

    path = eng.export_session("s", tmp_path / "s.safetensors")
    eng.import_session(path, "imported")
    r = eng.chat("imported", nxt[:2] + [reply, {"role": "user", "content": "y?"}], max_new_tokens=2)
    assert r.kv_cache == "rebuilt" and not r.replayed


def test_cancelled_stream_and_failed_turn_leave_no_cache(online):
    eng = online()
    msgs, _ = _chat_turns(eng, "s", 1)
    turn = eng.get_session("s").turn
    stream = eng.stream("s", msgs + [{"role": "user", "content": "Tell me a long story."}], max_new_tokens=50)
    next(stream)
    stream.close()  # the new message was written into the cache: the cache must not survive
    assert eng.get_session("s").turn == turn
    assert ("default", "s") not in eng._kv_pool
    r = eng.chat("s", msgs + [{"role": "user", "content": "Short one?"}], max_new_tokens=2)
    assert r.kv_cache == "rebuilt"
    # a turn refused for its size changes nothing and keeps the hot cache usable
    version = eng.get_session("s").version
    msgs = msgs + [{"role": "user", "content": "Short one?"}, {"role": "assistant", "content": r.text}]
    with pytest.raises(ContextLengthError):
        eng.chat("s", msgs + [{"role": "user", "content": "x"}], max_new_tokens=eng.context_window - 1)
    with pytest.raises(InvalidOptionError, match="max_new_tokens"):  # beyond any prompt: refused as an option
        eng.chat("s", msgs + [{"role": "user", "content": "x"}], max_new_tokens=10_000)
    assert eng.get_session("s").version == version
    assert eng.chat("s", msgs + [{"role": "user", "content": "And?"}], max_new_tokens=2).kv_cache == "hot"


def test_concurrent_update_is_retried_from_text(online):
    """Another writer commits between our load and our commit: the write is redone on a re-prefilled context."""
    from deltamem_agents.store.memory import InMemorySessionStore

    class Racing(InMemorySessionStore):
        raced = False

        def commit(self, session_id, **kw):
            if not self.raced and session_id == "s" and kw.get("written"):
                self.raced = True
                super().commit(session_id, expected_version=kw["expected_version"], state=[], written=[], window=[])
            return super().commit(session_id, **kw)

    store = Racing()
    eng = online(store=store)
    msgs, _ = _chat_turns(eng, "s", 1)
    assert store.raced
    r = eng.chat("s", msgs + [{"role": "user", "content": "Again?"}], max_new_tokens=2)
    assert r.kv_cache == "hot" and r.turn == eng.get_session("s").turn


def test_kv_cache_bytes_zero_re_prefills_every_turn(online):
    eng = online(kv_cache_bytes=0)
    _, results = _chat_turns(eng, "s", 3)
    assert [r.kv_cache for r in results] == ["new", "rebuilt", "rebuilt"]
    assert all(r.usage.cached_tokens == 0 for r in results)


def test_lru_is_bounded_in_bytes(online):
    probe = online()
    _chat_turns(probe, "a", 1)
    one = probe.kv_cache_stats().bytes
    eng = online(kv_cache_bytes=int(one * 1.6))  # room for about one session
    for sid in ("a", "b"):
        _chat_turns(eng, sid, 1)
    stats = eng.kv_cache_stats()
    assert stats.sessions == 1 and stats.bytes <= stats.capacity_bytes and stats.evictions >= 1


# ---------------------------------------------------------------------------------------------- on disk
def test_a_restarted_engine_resumes_from_the_saved_cache(online, tmp_path):
    store = __import__("deltamem_agents.store.memory", fromlist=["x"]).InMemorySessionStore()
    a = online(store=store, kv_cache_dir=tmp_path / "kv")
    msgs, _ = _chat_turns(a, "s", 2)
    a.close()
    assert list((tmp_path / "kv").iterdir())
    b = online(store=store, kv_cache_dir=tmp_path / "kv")
    counter = TokenCounter(b)
    nxt = msgs + [{"role": "user", "content": "Resumed?"}]
    r = b.chat("s", nxt, max_new_tokens=3)
    assert r.kv_cache == "disk" and r.usage.cached_tokens > 0
    assert counter.take() < r.usage.prompt_tokens  # the history was not run again
    # …and the state is what one process that never stopped would have
    c = online()
    full, _ = _chat_turns(c, "s", 2)
    assert full == msgs
    c.chat("s", nxt, max_new_tokens=3)
    assert b.session_state("s").equal(c.session_state("s"))


def test_stale_corrupt_or_foreign_cache_files_are_misses(online, tmp_path):
    from deltamem_agents.store.memory import InMemorySessionStore

    store = InMemorySessionStore()
    a = online(store=store, kv_cache_dir=tmp_path / "kv")
    msgs, _ = _chat_turns(a, "s", 2)
    a.close()
    (path,) = list((tmp_path / "kv").iterdir())

    # stale: the session moved on without this file being updated
    other = online(store=store)
    msgs2 = msgs + [{"role": "user", "content": "Elsewhere?"}]
    msgs2 += [{"role": "assistant", "content": other.chat("s", msgs2, max_new_tokens=2).text}]
    b = online(store=store, kv_cache_dir=tmp_path / "kv")
    assert b.chat("s", msgs2 + [{"role": "user", "content": "Here?"}], max_new_tokens=2).kv_cache == "rebuilt"
    b.close()

    # corrupt: one flipped byte in the tensor data
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    c = online(store=store, kv_cache_dir=tmp_path / "kv")
    last = store.load("s")
    msgs3 = msgs2 + [{"role": "user", "content": "Here?"}, {"role": "assistant", "content": last.window[-1].content}]
    assert c.chat("s", msgs3 + [{"role": "user", "content": "Now?"}], max_new_tokens=2).kv_cache == "rebuilt"
    assert not path.exists()  # removed, not retried

    # another adapter: the file is never used (and the session itself is refused by fingerprint)
    c.close()
    d = online(store=InMemorySessionStore(), kv_cache_dir=tmp_path / "kv", dm=make_tiny_dm(layers=4, seed=9))
    assert d._kv_files.load(("default", "s"), store.load("s"), d.model.base_model.config, d.device) is None


def test_disk_cap_keeps_the_newest_files(online, tmp_path):
    probe = online(kv_cache_dir=tmp_path / "probe")
    _chat_turns(probe, "x", 1)
    probe.close()
    one = next((tmp_path / "probe").iterdir()).stat().st_size
    eng = online(kv_cache_dir=tmp_path / "kv", kv_cache_dir_bytes=int(one * 2.5), kv_cache_bytes=0)
    for sid in ("a", "b", "c", "d"):
        _chat_turns(eng, sid, 1)
    files = list((tmp_path / "kv").iterdir())
    assert 1 <= len(files) <= 2
    assert eng._kv_files.total_bytes() <= int(one * 2.5)
