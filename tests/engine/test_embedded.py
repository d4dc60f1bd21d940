"""The engine on the embedded SmolLM2-135M-Instruct: model-level behaviour and the CLI across processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def engine(embedded, tmp_path_factory):
    from deltamem_agents.engine import MemoryEngine, SamplingParams

    path = tmp_path_factory.mktemp("store") / "s.db"
    # greedy: these tests compare texts and states across calls (the sampling defaults have their own test)
    eng = MemoryEngine(embedded, adapter="none", store=f"sqlite:///{path}", window_tokens=256,
                       sampling=SamplingParams(temperature=0.0))
    yield eng
    eng.close()
    eng.model.detach_adapter()  # the session-scoped embedded model is shared with other tests


def test_fresh_adapter_gives_base_model_reply(engine, embedded):
    """S₀ = 0 and writes off during generation: the first reply is exactly the base model's greedy reply."""
    model, tok = embedded
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    r = engine.chat("capital", msgs, max_new_tokens=8)
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with engine.model.memory_disabled(), torch.no_grad():
        out = engine.model.base_model.generate(ids, max_new_tokens=8, do_sample=False)
    expected = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert r.text == expected
    assert "Paris" in r.text
    assert r.usage.prompt_tokens == ids.shape[1]


def test_generation_defaults_do_not_loop_on_the_embedded_model(engine):
    """Greedy decoding of the embedded model loops on this first message (it ran to the token limit repeating
    "I'm not a magic spell, but I can certainly help you…"); the engine's defaults (temperature 0.2, top-p 0.9,
    repetition penalty 1.1 over the generated tokens) end the reply. Seeded, so the test is reproducible."""
    from deltamem_agents.engine.engine import DEFAULT_SAMPLING

    msgs = [{"role": "user", "content": "Remember: code 4417."}]
    greedy = engine.chat("loop-greedy", msgs, max_new_tokens=160)
    assert greedy.finish_reason == "length"  # the loop this default exists for
    d = DEFAULT_SAMPLING
    for seed in (0, 1, 2):
        r = engine.chat(f"loop-default-{seed}", msgs, temperature=d.temperature, top_p=d.top_p,
                        repetition_penalty=d.repetition_penalty, seed=seed, max_new_tokens=160)
        assert r.finish_reason == "stop", r.text


def test_stream_equals_chat_and_state_roundtrip(engine):
    msgs = [{"role": "user", "content": "Écris « bonjour » en japonais, s'il te plaît."}]
    full = engine.chat("a", msgs, max_new_tokens=16)
    chunks = list(engine.stream("b", msgs, max_new_tokens=16))
    assert "".join(c.text for c in chunks) == full.text
    assert all("\ufffd" not in c.text for c in chunks)
    state = engine.session_state("a")
    assert state.equal(engine.session_state("b"))
    probe = engine.tokenizer("And in French?", add_special_tokens=False)["input_ids"]
    fresh = engine.model.new_state(1)
    reloaded = engine.session_state("a")
    a, _ = engine.runner.forward(state, probe, writes=False)
    b, _ = engine.runner.forward(reloaded, probe, writes=False)
    assert torch.equal(a, b)
    c, _ = engine.runner.forward(fresh, probe, writes=False)
    assert not torch.equal(a, c)


def test_cli_chat_keeps_memory_across_processes(tmp_path, embedded, capsys):
    from deltamem_agents.cli import main

    store = f"sqlite:///{tmp_path}/cli.db"
    chat = [sys.executable, "-m", "deltamem_agents.cli", "chat", "--session", "cli", "--store", store,
            "--max-new-tokens", "4", "--adapter", "none", "--kv-cache-dir", str(tmp_path / "kv"), "-v"]

    def sessions(*args):
        capsys.readouterr()
        assert main(["sessions", *args, "--store", store]) == 0
        return capsys.readouterr().out

    out = subprocess.run([*chat, "--message", "My name is Ada."], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    show = json.loads(sessions("show", "cli", "--json"))
    assert show["turn"] == 1 and show["written_messages"] == 2
    # a second process: the REPL reads stdin lines; it loads the stored state (fingerprints must match)
    out = subprocess.run(chat, input="What is my name?\n/exit\n", capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "kv cache disk" in out.stderr  # the first process saved its KV cache: the second did not re-prefill
    show = json.loads(sessions("show", "cli", "--json"))
    assert show["turn"] == 2 and show["written_messages"] == 4
    assert [s["session_id"] for s in json.loads(sessions("list", "--json"))] == ["cli"]
    sessions("fork", "cli", "cli2", "--turn", "1")
    assert json.loads(sessions("show", "cli2", "--json"))["turn"] == 1
    sessions("rollback", "cli", "1")
    assert json.loads(sessions("show", "cli", "--json"))["written_messages"] == 2
    sessions("reset", "cli2")
    sessions("delete", "cli2")
    assert [s["session_id"] for s in json.loads(sessions("list", "--json"))] == ["cli"]
    assert main(["sessions", "show", "cli2", "--store", store]) == 1  # a clear error, exit status 1


def test_cli_device_and_dtype_reach_the_engine(embedded):
    """``deltamem chat --device cpu --dtype bfloat16``: the base loads in bf16, the adapter stays float32."""
    import torch

    from deltamem_agents.cli import build_parser
    from deltamem_agents.engine.cli_commands import _engine

    argv = ["chat", "--session", "s", "--device", "cpu", "--dtype", "bfloat16", "--adapter", "none",
            "--store", "sqlite://"]
    engine = _engine(build_parser(argv).parse_args(argv))
    try:
        assert next(engine.model.base_model.parameters()).dtype == torch.bfloat16
        assert {p.dtype for p in engine.model.delta_layers.parameters()} == {torch.float32}
        assert engine.device == torch.device("cpu")
        result = engine.chat("s", [{"role": "user", "content": "Hello"}], max_new_tokens=3)
        assert result.usage.completion_tokens > 0
    finally:
        engine.close()
