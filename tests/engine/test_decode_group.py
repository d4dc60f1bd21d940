"""Batched decoding at the unit level: :class:`DecodeGroup` (merged left-padded caches) and :class:`DecodeBatcher`
(the decode thread) against the one-at-a-time reference, on tiny random Llama, Qwen3 and Gemma3 models.

What is asserted, and why it holds:

* Every row's logits equal running that session alone within ``ATOL``/``RTOL`` (padding is masked, each row's
  RoPE position is its own), so greedy tokens are equal too — once it is checked that no step of the reference
  has a near tie.
* A row leaving the group gets back its own cache: the prompt's KV **bitwise** (an exact copy), the generated
  tokens' KV within tolerance, the same length and (sliding-window layers) the same window.
* Nothing leaks between rows: garbage in the padding columns or another row's content leaves a row's logits
  unchanged within tolerance; a lone row (no padding) is bitwise the alone call.
* A session failing in its own decoder, or abandoned by its consumer, leaves; the others go on unchanged.
"""

from __future__ import annotations

import threading

import pytest
import torch
from batch_helpers import KV_ATOL, StepGate, alone, assert_close, assert_no_near_ties
from tiny_models import randomize, tiny_model

from deltamem_agents.adapter import DeltaMemConfig, attach
from deltamem_agents.engine.batching import ModelRunner
from deltamem_agents.engine.decode_batcher import DecodeBatcher
from deltamem_agents.engine.decode_group import DecodeGroup, GroupRow, cache_layout, model_can_batch
from deltamem_agents.engine.sampling import SamplingParams
from deltamem_agents.engine.token_decoder import TokenDecoder

# gemma3: 7 layers = sliding-window layers (window 8, so the longer prompts slide) and one full-attention layer
LAYERS = {"llama": 2, "qwen3": 2, "gemma3": 7}


def _runner(arch: str, write_mode: str = "tsw") -> ModelRunner:
    dm = attach(tiny_model(arch, layers=LAYERS[arch]), DeltaMemConfig(write_mode=write_mode))
    randomize(dm)
    dm.eval()
    return ModelRunner(dm, torch.device("cpu"))


@pytest.fixture(scope="module", params=sorted(LAYERS))
def runner(request):
    return _runner(request.param)


def _sessions(runner, lengths, seed=0):
    """Per session a prompt of the given length and a distinct state (a few written tokens)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        prompt = torch.randint(3, 96, (n,), generator=g).tolist()
        _, state = runner.forward(runner.model.new_state(1), torch.randint(3, 96, (5,), generator=g).tolist(),
                                  writes=True, want_logits=False)
        out.append((prompt, state))
    return out


def _join(runner, prompt, state):
    """A session's own prefill, as the engine runs it before joining: ``(row, first_token)``."""
    cache = runner.new_cache()
    logits, _ = runner.forward(state, prompt, cache=cache, writes=False)
    return GroupRow(cache, state), int(logits.argmax())


def _assert_cache_matches(own, ref, prompt_len: int, msg: str) -> None:
    """``own`` (restored from the group) against ``ref`` (the alone run): same length and window; the columns
    of prompt positions bitwise, the generated ones within tolerance."""
    assert own.get_seq_length() == ref.get_seq_length(), msg
    for li, (a, b) in enumerate(zip(own.layers, ref.layers, strict=True)):
        assert a.keys.shape == b.keys.shape and a.values.shape == b.values.shape, f"{msg} layer {li}"
        first = ref.get_seq_length() - b.keys.shape[2]  # the position of the first column the layer keeps
        prompt_cols = max(0, prompt_len - first)
        assert torch.equal(a.keys[:, :, :prompt_cols], b.keys[:, :, :prompt_cols]), f"{msg} layer {li}"
        assert torch.equal(a.values[:, :, :prompt_cols], b.values[:, :, :prompt_cols]), f"{msg} layer {li}"
        assert_close(a.keys, b.keys, f"{msg} layer {li} keys", atol=KV_ATOL)
        assert_close(a.values, b.values, f"{msg} layer {li} values", atol=KV_ATOL)
        if hasattr(b, "cumulative_length"):
            assert a.cumulative_length == b.cumulative_length, msg


def test_group_rows_equal_running_alone(runner):
    """Five sessions of odd lengths (1 … 18; > the Gemma3 window of 8) join at different steps and leave after
    different numbers of steps; every row is compared step by step with its session run alone."""
    lengths = [5, 13, 1, 9, 18]
    steps = [6, 11, 4, 9, 7]
    joins = [0, 0, 3, 3, 5]  # the group step at which each session arrives
    sessions = _sessions(runner, lengths)
    refs = [alone(runner, st, p, n) for (p, st), n in zip(sessions, steps, strict=True)]
    for i, ref in enumerate(refs):
        assert_no_near_ties([ref[1], *ref[3]], f"session {i}")

    group = DecodeGroup(runner)
    rows, tokens, logits = [None] * 5, [[] for _ in lengths], [[] for _ in lengths]
    step = 0
    while step == 0 or group.rows:
        arriving = [i for i in range(5) if joins[i] == step]
        for i in arriving:
            rows[i], first = _join(runner, *sessions[i])
            rows[i].owner = i
            tokens[i].append(first)
        group.add([rows[i] for i in arriving])
        order = [r.owner for r in group.rows]
        out = group.step([tokens[i][-1] for i in order])
        for b, i in enumerate(order):
            logits[i].append(out[b])
            tokens[i].append(int(out[b].argmax()))
        group.remove([rows[i] for i in order if len(logits[i]) == steps[i]])
        step += 1
    assert group.cache is None and group.state is None  # an empty group holds nothing

    for i, (cache, _, ref_tokens, ref_logits) in enumerate(refs):
        for k, (got, want) in enumerate(zip(logits[i], ref_logits, strict=True)):
            assert_close(got, want, f"session {i} step {k}")
        assert tokens[i] == ref_tokens, f"session {i}"
        _assert_cache_matches(rows[i].cache, cache, lengths[i], f"session {i}")
        assert cache_layout(rows[i].cache) is not None  # a valid cache again: the turn can crop and keep it


def test_a_restored_cache_continues_like_the_alone_one(runner):
    """After leaving, the session's own cache is usable by the plain path: the next forward calls on it give
    the alone run's logits within tolerance."""
    (p1, s1), (p2, s2) = _sessions(runner, [3, 11], seed=4)
    ref_cache, _, ref_tokens, _ = alone(runner, s1, p1, 5)
    group = DecodeGroup(runner)
    row1, t1 = _join(runner, p1, s1)
    row2, t2 = _join(runner, p2, s2)
    group.add([row1, row2])
    tokens = [t1]
    for _ in range(5):
        out = group.step([tokens[-1], t2])
        tokens.append(int(out[0].argmax()))
        t2 = int(out[1].argmax())
    group.remove([row1])
    assert tokens == ref_tokens
    for extra in ([7], [8, 9, 10]):
        got, _ = runner.forward(s1, extra, cache=row1.cache, writes=False)
        want, _ = runner.forward(s1, extra, cache=ref_cache, writes=False)
        assert_close(got, want, f"continuing with {extra}")
    assert len(group) == 1 and group.width == row2.length  # row 1's longer padding was cut


def test_padding_and_other_rows_never_leak_into_a_row(runner):
    (pa, sa), (pb, sb), (pc, sc) = _sessions(runner, [3, 11, 17], seed=1)
    _, _, ref_tokens, ref_logits = alone(runner, sa, pa, 1)

    def first_step(other, garbage):
        group = DecodeGroup(runner)
        row, token = _join(runner, pa, sa)
        group.add([row, _join(runner, *other)[0]])
        if garbage:  # the padding columns of row A: anything there must not matter
            for layer in group.cache.layers:
                pad = layer.keys.shape[2] - min(row.length, layer.keys.shape[2])
                layer.keys[0, :, :pad] = 1e4 * torch.randn_like(layer.keys[0, :, :pad])
                layer.values[0, :, :pad] = -1e4 * torch.randn_like(layer.values[0, :, :pad])
        return group.step([token, 5])[0]

    with_b = first_step((pb, sb), garbage=False)
    with_c = first_step((pc, sc), garbage=False)  # another row: other content, other length, other state
    with_garbage = first_step((pb, sb), garbage=True)
    for got in (with_b, with_c, with_garbage):
        assert_close(got, ref_logits[0], "row A")


def test_a_lone_row_is_bitwise_the_alone_call(runner):
    """No padding (one row) → no mask, the same shapes and inputs as the alone call: bitwise equal."""
    ((p, s),) = _sessions(runner, [7], seed=2)
    _, _, ref_tokens, ref_logits = alone(runner, s, p, 4)
    group = DecodeGroup(runner)
    row, token = _join(runner, p, s)
    group.add([row])
    for k in range(4):
        out = group.step([token])[0]
        assert torch.equal(out, ref_logits[k]), k
        token = int(out.argmax())
        assert token == ref_tokens[k + 1]


def test_sequence_write_states_batch_too():
    """SSW states carry per-row pending sums and segment ids; rows still read only their own."""
    runner = _runner("llama", write_mode="ssw")
    sessions = _sessions(runner, [4, 10], seed=3)
    refs = [alone(runner, s, p, 5) for p, s in sessions]
    group = DecodeGroup(runner)
    joined = [_join(runner, p, s) for p, s in sessions]
    group.add([r for r, _ in joined])
    assert group.state.sequence_write and group.state.batch_size == 2
    tokens = [t for _, t in joined]
    for k in range(5):
        out = group.step(tokens)
        for i in range(2):
            assert_close(out[i], refs[i][3][k], f"row {i} step {k}")
        tokens = [int(o.argmax()) for o in out]


def test_caches_the_group_cannot_take_are_refused(runner):
    group = DecodeGroup(runner)
    empty = runner.new_cache()
    assert model_can_batch(empty) and cache_layout(empty) is None  # nothing prefilled yet
    with pytest.raises(ValueError, match="cannot be batched"):
        group.add([GroupRow(empty, runner.model.new_state(1))])
    assert len(group) == 0 and group.cache is None
    with pytest.raises(ValueError, match="tokens for"):
        group.step([1])


# ------------------------------------------------------------------------------------------ the decode thread
class FailingDecoder(TokenDecoder):
    """A decoder whose session fails at its third step (a stand-in for any per-session error)."""

    def step(self, logits):
        if len(self.generated) == 3:
            raise RuntimeError("this session's decoder failed")
        return super().step(logits)


def _tok():
    class Tok:  # ids → text, enough for the accumulator (the tiny models have no tokenizer)
        def decode(self, ids, **_):
            return " ".join(map(str, ids))

    return Tok()


def test_batcher_isolates_a_failing_and_an_abandoned_session():
    runner = _runner("qwen3")
    sessions = _sessions(runner, [6, 2, 12, 9], seed=5)
    steps = 10
    refs = [alone(runner, s, p, steps) for p, s in sessions]
    greedy = SamplingParams(temperature=0.0)
    batcher = DecodeBatcher(runner, max_rows=4)
    gate = StepGate(runner, batcher, n=4)
    results: dict[int, object] = {}

    def run(i):
        prompt, state = sessions[i]
        cache = runner.new_cache()
        logits, _ = runner.forward(state, prompt, cache=cache, writes=False)
        kind = FailingDecoder if i == 1 else TokenDecoder
        decoder = kind(_tok(), greedy, set(), (), steps + 1)
        _, token = decoder.step(logits)  # as generate() does with the prefill's logits
        events = batcher.decode(decoder, state, cache, token)
        try:
            for k, event in enumerate(events):
                if i == 3 and k == 2:
                    events.close()  # the consumer goes away (a closed stream)
                    results[i] = ("closed", decoder.generated)
                    return
                if event.finish_reason is not None:
                    results[i] = (event.finish_reason, decoder.generated, cache)
        except RuntimeError as exc:
            results[i] = ("error", str(exc))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[1] == ("error", "this session's decoder failed")
    assert results[3][0] == "closed"
    for i in (0, 2):
        reason, generated, cache = results[i]
        assert reason == "length" and generated == refs[i][2][: len(generated)] and len(generated) == steps + 1
        _assert_cache_matches(cache, refs[i][0], len(sessions[i][0]), f"session {i}")
    assert max(gate.sizes) == 4  # all four shared steps
    assert batcher.sessions == 0 and batcher.stats.joined == 4 and batcher.stats.left == 4
