"""``MemoryEngine(batch_decode=True)`` through real threads (``engine.chat``/``stream``/``astream``): sessions
generating at the same time share batched decode steps, and each ends exactly where running it alone ends.

What is asserted, and why it holds:

* Texts, finish reasons and token counts equal those of an engine running every session alone (one forward
  call at a time). Batched logits equal alone within a tolerance (``test_decode_group``); greedy texts are
  then equal because no step of the alone run has a near tie (checked on its recorded logits).
* Committed sessions (state, written record, window, turn) are **bitwise** those of the alone engine: writes
  never run batched, and a session leaving the batch gets its prompt's KV back as an exact copy, so with the
  same text every write runs on the same inputs.
* In ``online`` mode the hot KV cache kept after a batched turn is bitwise the alone engine's, and the next
  turn continues it (``kv_cache == "hot"``).
* A session whose stream is closed, or that is cancelled, commits nothing and does not disturb the others.
* ``StepGate`` holds the first batched step until every session of the test is in the batcher, so the
  sessions really share steps whatever the thread timing (asserted from the step sizes).
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from batch_helpers import LogitRecorder, StepGate, assert_no_near_ties
from engine_helpers import conversation, make_tiny_dm

from deltamem_agents.engine import SamplingParams


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def dm(request):
    # 4 layers: deep enough that the KV of earlier messages feeds later writes
    return make_tiny_dm(layers=4, seed=3, arch=request.param)


def _requests():
    """Four sessions: different history lengths (odd prompt lengths), answer lengths and sampling."""
    out = {}
    for i in range(4):
        msgs = conversation(1 + i % 3) + [{"role": "user", "content": "Tell me more. " * (i + 1) + f"Q{i}?"}]
        kwargs = {"max_new_tokens": (5, 17, 9, 13)[i]}
        if i == 2:  # a seeded sampler: each session keeps its own generator inside the batch
            kwargs.update(temperature=0.8, top_p=0.95, seed=11)
        out[f"s{i}"] = (msgs, kwargs)
    return out


def _run_alone(engine, requests):
    recorder = LogitRecorder(engine.runner)
    results = {}
    for sid, (msgs, kw) in requests.items():
        recorder.logits.clear()
        results[sid] = engine.chat(sid, msgs, **kw)
        if "temperature" not in kw:  # greedy: the premise of comparing texts
            assert_no_near_ties(recorder.logits, sid)
    return results


def _run_threads(engine, requests, gate_n=None):
    gate = StepGate(engine.runner, engine._batcher, n=gate_n or len(requests))
    results, errors = {}, []

    def run(sid, msgs, kw):
        try:
            results[sid] = engine.chat(sid, msgs, **kw)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(sid, *req)) for sid, req in requests.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results, gate


def _assert_sessions_equal(a, b, sids):
    for sid in sids:
        assert a.session_state(sid).equal(b.session_state(sid)), sid
        da, db = a.store.load(sid), b.store.load(sid)
        assert (da.info.turn, da.written, da.window) == (db.info.turn, db.written, db.window), sid


@pytest.mark.parametrize("mode", ["online", "windowed"])
def test_threads_batched_equal_alone(make_engine, dm, mode):
    requests = _requests()
    alone = make_engine(dm=dm, mode=mode)
    ref = _run_alone(alone, requests)
    batched = make_engine(dm=dm, mode=mode, batch_decode=True)
    got, gate = _run_threads(batched, requests)
    assert max(gate.sizes) == 4 and batched.batch_stats().max_rows == 4
    for sid in requests:
        assert got[sid].text == ref[sid].text, sid
        assert got[sid].finish_reason == ref[sid].finish_reason, sid
        assert got[sid].usage == ref[sid].usage, sid
    _assert_sessions_equal(batched, alone, requests)
    assert batched._batcher.sessions == 0


def _hot_context(engine, sid):
    pool = engine._kv_pool
    context = pool.take(("default", sid))
    pool.put(("default", sid), context)
    return context


def test_hot_cache_after_a_batched_turn_continues_next_turn(make_engine, dm):
    requests = dict(list(_requests().items())[:3])
    alone = make_engine(dm=dm, mode="online")
    batched = make_engine(dm=dm, mode="online", batch_decode=True)
    ref1 = _run_alone(alone, requests)
    got1, _ = _run_threads(batched, requests)
    second = {sid: (msgs + [{"role": "assistant", "content": ref1[sid].text},
                            {"role": "user", "content": "And then?"}], kw) for sid, (msgs, kw) in requests.items()}
    ref2 = _run_alone(alone, second)
    got2, gate = _run_threads(batched, second)
    assert max(gate.sizes) == 3
    for sid in requests:
        assert got1[sid].text == ref1[sid].text and got2[sid].text == ref2[sid].text, sid
        assert got2[sid].kv_cache == ref2[sid].kv_cache == "hot", sid
        assert got2[sid].usage.cached_tokens == ref2[sid].usage.cached_tokens > 0
        a, b = _hot_context(batched, sid), _hot_context(alone, sid)
        assert (a.indices, a.digests, a.head_tokens) == (b.indices, b.digests, b.head_tokens)
        for la, lb in zip(a.cache.layers, b.cache.layers, strict=True):
            assert la.keys.equal(lb.keys) and la.values.equal(lb.values), sid
    _assert_sessions_equal(batched, alone, requests)


def test_a_closed_stream_leaves_the_others_untouched(make_engine, dm):
    requests = _requests()
    leaving = "s1"  # 17 tokens wanted; its consumer goes away after three chunks
    alone = make_engine(dm=dm, mode="online")
    ref = _run_alone(alone, {s: r for s, r in requests.items() if s != leaving})
    batched = make_engine(dm=dm, mode="online", batch_decode=True)
    gate = StepGate(batched.runner, batched._batcher, n=4)
    results, chunks, errors = {}, [], []

    def run(sid, msgs, kw):
        try:
            if sid != leaving:
                results[sid] = batched.chat(sid, msgs, **kw)
                return
            stream = batched.stream(sid, msgs, **kw)
            for chunk in stream:
                chunks.append(chunk)
                if len(chunks) == 3:  # chunks after the first come from the batch: it had joined
                    stream.close()
                    return
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(sid, *req)) for sid, req in requests.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert max(gate.sizes) == 4 and len(chunks) == 3 and all(c.result is None for c in chunks)
    for sid, r in ref.items():
        assert results[sid].text == r.text and results[sid].finish_reason == r.finish_reason, sid
    _assert_sessions_equal(batched, alone, ref)
    assert not batched.store.exists(leaving)  # a new session is created by its first commit: there was none
    assert ("default", leaving) not in batched._kv_pool
    assert batched._batcher.sessions == 0


def test_a_cancelled_astream_leaves_the_others_untouched(make_engine, dm):
    requests = _requests()
    leaving = "s3"
    alone = make_engine(dm=dm, mode="windowed")
    ref = _run_alone(alone, {s: r for s, r in requests.items() if s != leaving})
    batched = make_engine(dm=dm, mode="windowed", batch_decode=True)
    gate = StepGate(batched.runner, batched._batcher, n=4)

    async def leave_early(msgs, kw):
        n = 0
        async for _ in batched.astream(leaving, msgs, **kw):
            n += 1
            if n == 3:
                break  # astream sets its cancel event: generation ends with "cancelled", nothing is written
        return n

    async def main():
        others = [batched.achat(sid, msgs, **kw) for sid, (msgs, kw) in requests.items() if sid != leaving]
        return await asyncio.gather(leave_early(*requests[leaving]), *others)

    n, *results = asyncio.run(main())
    assert n == 3 and max(gate.sizes) == 4
    for (sid, r), got in zip(ref.items(), results, strict=True):
        assert got.text == r.text, sid
    _assert_sessions_equal(batched, alone, ref)
    assert not batched.store.exists(leaving)


def test_batch_decode_options_are_validated(make_engine, dm):
    with pytest.raises(TypeError, match="batch_decode"):
        make_engine(dm=dm, batch_decode="yes")
    with pytest.raises(ValueError, match="batch_max_rows"):
        make_engine(dm=dm, batch_decode=True, batch_max_rows=0)
    off = make_engine(dm=dm)
    assert off.batch_decode is False and off.batch_stats() is None
    on = make_engine(dm=dm, batch_decode=True, batch_max_rows=2)
    assert on.batch_decode is True and on.batch_stats().steps == 0


def test_more_sessions_than_rows_wait_for_a_row(make_engine, dm):
    """``batch_max_rows=2`` with four sessions: never more than two rows per step, everyone finishes equal."""
    requests = _requests()
    alone = make_engine(dm=dm, mode="online", sampling=SamplingParams(temperature=0.0))
    ref = _run_alone(alone, requests)
    batched = make_engine(dm=dm, mode="online", batch_decode=True, batch_max_rows=2)
    got, gate = _run_threads(batched, requests)
    assert max(gate.sizes) == 2
    for sid in requests:
        assert got[sid].text == ref[sid].text, sid
    _assert_sessions_equal(batched, alone, requests)
