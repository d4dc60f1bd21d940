"""The ``deltamem`` command as a user meets it: help texts, ``--threads``, Ctrl-C, the spinner, and
``sessions list`` / ``show`` without torch."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pytest

from deltamem_agents import cli
from deltamem_agents.cli import main
from deltamem_agents.cli_support import THREADS_ENV, default_threads
from deltamem_agents.engine import cli_commands

STOPPED = "(stopped — nothing of this turn was saved)"


@pytest.fixture(autouse=True)
def _restore_threads():
    """``--threads`` sets torch's process-wide thread count; put it back for the other tests."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _help(capsys, monkeypatch, *argv: str) -> str:
    monkeypatch.setenv("COLUMNS", "400")  # one line per paragraph: phrases are not broken by wrapping
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- help
def test_chat_help_shows_defaults_and_what_each_mode_remembers(capsys, monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    out = _help(capsys, monkeypatch, "chat")
    assert "(default: 1024)" in out  # --window-tokens
    assert "(default: 512)" in out  # --max-new-tokens
    assert "(default: 0.2)" in out and "(default: 0.9)" in out and "(default: 1.1)" in out  # sampling
    assert "kv-cache/ in the deltamem cache dir" in out  # --kv-cache-dir
    assert "(default: default)" in out  # --namespace
    assert f"(default: {default_threads()}: $DELTAMEM_THREADS if set, else max(1, min(4, CPUs // 2))" in out
    assert "(default: None)" not in out and "(default: False)" not in out
    # --mode: which mode remembers what
    assert "what the model sees of earlier turns (default: online)" in out
    lines = [line.strip() for line in out.splitlines()]
    online = next(line for line in lines if line.startswith("online:"))
    assert "as far as the context window allows" in online and "KV cache kept hot between turns" in online
    assert "every message is also written into the δ-mem state" in online
    windowed = next(line for line in lines if line.startswith("windowed:"))
    assert "only the last --window-tokens of text" in windowed and "only in the state" in windowed
    state_only = next(line for line in lines if line.startswith("state-only:"))
    assert "only the current turn" in state_only and "only in the state" in state_only
    assert any("untrained adapter" in line and "only what is in the prompt is remembered" in line for line in lines)
    assert "Ctrl-C stops the answer" in out


def test_threads_help_is_the_same_on_every_model_command(capsys, monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "3")

    def threads_line(*argv: str) -> str:
        return next(line.strip() for line in _help(capsys, monkeypatch, *argv).splitlines()
                    if line.strip().startswith("--threads"))

    line = threads_line("chat")
    assert "(default: 3:" in line
    assert threads_line("bench", "speed") == line
    assert threads_line("bench", "conversation") == line
    assert threads_line("eval") == line


def test_default_threads(monkeypatch, capsys):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    for cpus, expected in ((None, 1), (1, 1), (2, 1), (4, 2), (6, 3), (8, 4), (64, 4)):
        monkeypatch.setattr(os, "cpu_count", lambda c=cpus: c)
        assert default_threads() == expected, cpus
    monkeypatch.setenv(THREADS_ENV, "7")
    assert default_threads() == 7
    monkeypatch.setenv(THREADS_ENV, "0")  # 0: torch's own choice
    assert default_threads() == 0
    monkeypatch.setenv(THREADS_ENV, "lots")
    assert default_threads() == 4  # falls back to the formula (64 CPUs), loudly
    assert "warning: ignoring $DELTAMEM_THREADS='lots'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["chat", "--session", "s", "--threads", "-1"])
    assert "expected a non-negative integer" in capsys.readouterr().err


def test_env_sets_the_threads_default(monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "2")
    args = cli.build_parser(["chat"]).parse_args(["chat", "--session", "s"])
    assert args.threads == 2
    args = cli.build_parser(["chat"]).parse_args(["chat", "--session", "s", "--threads", "5"])
    assert args.threads == 5


def test_only_the_commands_plugin_is_imported():
    assert cli._plugins_for(["sessions", "list"]) == ["deltamem_agents.engine.cli_commands"]
    assert cli._plugins_for(["chat", "--session", "x"]) == ["deltamem_agents.engine.cli_commands"]
    assert cli._plugins_for(["eval", "synthetic"]) == ["deltamem_agents.evaluation.cli_commands"]
    assert cli._plugins_for(["db", "upgrade"]) == []
    every = list(cli._PLUGIN_MODULES)
    assert cli._plugins_for(["--help"]) == every and cli._plugins_for(["no-such"]) == every
    assert cli._plugins_for(None) == every


# ---------------------------------------------------------------------------------------------- a real engine
@pytest.fixture(scope="module")
def tiny_pair():
    """A 2-layer random Llama with the embedded tokenizer's vocabulary, and that tokenizer (no weights needed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from deltamem_agents.models import embedded_model_dir

    path = embedded_model_dir()
    if not (path / "tokenizer_config.json").is_file():
        pytest.skip("embedded model not fetched (run `deltamem model fetch`)")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=49152, max_position_embeddings=512,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture
def chat(tiny_pair, tmp_path, monkeypatch):
    """``chat(*argv, stream=None)`` runs ``deltamem chat`` on the tiny model with a SQLite store; returns
    ``(rc, stdout, stderr)``. ``stream(real_stream, call_index)`` may wrap the engine's stream."""
    import torch

    url = f"sqlite:///{tmp_path}/sessions.db"
    state: dict = {"calls": 0, "threads_at_load": None, "engine": None}

    def run(*argv: str, stream=None, capsys=None):
        from deltamem_agents.engine import MemoryEngine

        def make_engine(args, **kwargs):
            state["threads_at_load"] = torch.get_num_threads()
            engine = MemoryEngine(tiny_pair, adapter="none", store=args.store, namespace=args.namespace, **kwargs)
            if stream is not None:
                real = engine.stream

                def wrapped(*a, **k):
                    state["calls"] += 1
                    return stream(real(*a, **k), state["calls"])

                engine.stream = wrapped
            state["engine"] = engine
            return engine

        monkeypatch.setattr(cli_commands, "_engine", make_engine)
        try:
            return main(["chat", "--store", url, "--kv-cache-dir", str(tmp_path / "kv"), "--max-new-tokens", "4", *argv])
        finally:
            if state["engine"] is not None:  # the tiny base model is shared by the calls
                state["engine"].model.detach_adapter()
                state["engine"] = None

    run.url = url
    run.state = state
    return run


def _turn(url: str, session: str = "s") -> int:
    from deltamem_agents.store import open_store

    store = open_store(url)
    try:
        return store.get(session, namespace="default").turn if store.exists(session, namespace="default") else 0
    finally:
        store.close()


def _interrupt_after_first_chunk(closed: list):
    """A stream that hands over the engine's first chunk, then Ctrl-C arrives (the engine's stream is closed)."""

    def stream(real, call):
        try:
            for chunk in real:
                yield chunk
                raise KeyboardInterrupt
        finally:
            real.close()
            closed.append(call)

    return stream


def test_threads_are_set_before_the_model_loads(chat, capsys):
    assert chat("--session", "s", "--message", "hi", "--threads", "3", "-v") == 0
    assert chat.state["threads_at_load"] == 3
    err = capsys.readouterr().err
    assert "torch threads 3]" in err


def test_ctrl_c_during_message_saves_nothing_and_exits_130(chat, capsys):
    assert chat("--session", "s", "--message", "My name is Ada.") == 0
    assert _turn(chat.url) == 1
    capsys.readouterr()
    closed: list = []
    assert chat("--session", "s", "--message", "What is my name?", stream=_interrupt_after_first_chunk(closed)) == 130
    out, err = capsys.readouterr()
    assert err.count(STOPPED) == 1 and "Traceback" not in err
    assert out.endswith("\n")  # the cut-off answer's line is ended
    assert closed == [1]
    assert _turn(chat.url) == 1  # the session is unchanged
    assert chat("--session", "s", "--message", "Again?") == 0
    assert _turn(chat.url) == 2


def test_ctrl_c_in_the_repl_stops_the_answer_and_goes_on(chat, capsys, monkeypatch):
    closed: list = []

    def first_only(real, call):
        return _interrupt_after_first_chunk(closed)(real, call) if call == 1 else real

    monkeypatch.setattr(sys, "stdin", io.StringIO("first question\nsecond question\n"))
    assert chat("--session", "r", stream=first_only) == 0  # EOF after the second answer
    out, err = capsys.readouterr()
    assert err.count(STOPPED) == 1 and "Traceback" not in err
    assert closed == [1]
    assert _turn(chat.url, "r") == 1  # only the second question's turn was saved


class _InterruptingStdout(io.StringIO):
    def write(self, text: str) -> int:
        if text and not self.getvalue():
            super().write(text)
            raise KeyboardInterrupt  # Ctrl-C while the CLI prints, between two chunks
        return super().write(text)


def test_ctrl_c_between_chunks_closes_the_stream_before_reporting(chat, monkeypatch):
    from deltamem_agents.engine import ChatChunk

    err = io.StringIO()
    closed: list = []

    def texty(real, call):  # every chunk has text, so the first print is interrupted
        try:
            for chunk in real:
                yield ChatChunk(chunk.text or "x", chunk.session_id, chunk.finish_reason, chunk.usage, chunk.result)
        finally:
            closed.append(STOPPED in err.getvalue())  # closed before "stopped" is reported?
            real.close()

    monkeypatch.setattr(sys, "stdout", _InterruptingStdout())
    monkeypatch.setattr(sys, "stderr", err)
    assert chat("--session", "c", "--message", "hello", stream=texty) == 130
    assert closed == [False]
    assert STOPPED in err.getvalue()
    assert _turn(chat.url, "c") == 0


class _InterruptingStdin:
    def isatty(self) -> bool:
        return False

    def readline(self) -> str:
        raise KeyboardInterrupt


def test_ctrl_c_or_eof_at_the_prompt_exits_0(chat, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", _InterruptingStdin())
    assert chat("--session", "p") == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert chat("--session", "p") == 0
    assert "Traceback" not in capsys.readouterr().err
    assert _turn(chat.url, "p") == 0


def test_ctrl_c_while_the_model_loads_exits_130(monkeypatch, capsys):
    def loading(args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_commands, "_engine", loading)
    assert main(["chat", "--session", "s", "--message", "hi", "--threads", "1"]) == 130
    assert "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the spinner
class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_thinking_indicator_only_on_a_terminal_and_erased(monkeypatch):
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    thinking = cli_commands._Thinking()
    thinking.start()
    time.sleep(3.5 * thinking.INTERVAL_S)
    thinking.stop()
    text = tty.getvalue()
    assert "thinking…" in text and text.endswith("\r\x1b[K")
    thinking.stop()  # idempotent

    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    thinking.start()
    time.sleep(2 * thinking.INTERVAL_S)
    thinking.stop()
    assert pipe.getvalue() == ""


def test_chat_prints_no_indicator_when_stderr_is_not_a_terminal(chat, capsys):
    assert chat("--session", "q", "--message", "hello") == 0
    err = capsys.readouterr().err
    assert "thinking" not in err and "\x1b[K" not in err


# ---------------------------------------------------------------------------------------------- sessions, no torch
def test_sessions_list_and_show_do_not_import_torch(tmp_path):
    from deltamem_agents.store import open_store

    url = f"sqlite:///{tmp_path}/sessions.db"
    store = open_store(url)
    store.create("alice", namespace="default", model_fingerprint="m" * 64, adapter_fingerprint="a" * 64)
    store.close()
    code = (
        "import sys\n"
        "from deltamem_agents.cli import main\n"
        f"rc = main(['sessions', 'list', '--store', {url!r}, '--json'])\n"
        f"rc |= main(['sessions', 'show', 'alice', '--store', {url!r}, '--json'])\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "sys.exit(rc)\n"
    )
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr
    listed, _, shown = out.stdout.partition("]\n")
    assert [s["session_id"] for s in json.loads(listed + "]")] == ["alice"]
    assert json.loads(shown)["turn"] == 0
    print(f"sessions list + show in a fresh process: {elapsed:.2f}s")


# ---------------------------------------------------------------------------------------------- errors: one line
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _deltamem(*argv: str, env: dict | None = None, wrap=None, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real ``deltamem`` command (this tree's package first on the path) in a subprocess."""
    import shutil

    script = shutil.which("deltamem", path=os.path.dirname(sys.executable))
    command = [script] if script else [sys.executable, "-m", "deltamem_agents.cli"]
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
                "OMP_NUM_THREADS": "1"}
    full_env.pop("DELTAMEM_DEBUG", None)
    for name, value in (env or {}).items():  # None unsets
        if value is None:
            full_env.pop(name, None)
        else:
            full_env[name] = value
    argv_ = [*command, *argv]
    return subprocess.run(wrap(argv_) if wrap else argv_, capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=REPO)


def _one_error_line(out: subprocess.CompletedProcess, rc: int, *needles: str) -> str:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == rc, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


#: Cases that must fail before the model loads: with the model pointed at an empty directory, a command that
#: loaded it first would fail on that instead.
NO_MODEL = {"DELTAMEM_MODEL_DIR": "/nonexistent/deltamem-model"}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_chat_errors_are_one_line_before_the_model_loads(tmp_path):
    db = str(tmp_path / "s.db")
    _one_error_line(_deltamem("chat", "--session", "a b", "--message", "hi", "--store", db, env=NO_MODEL), 2,
                    "invalid session id 'a b'")
    _one_error_line(_deltamem("chat", "--session", "s", "--message", "", "--store", db, env=NO_MODEL), 2,
                    "empty user message")
    _one_error_line(_deltamem("chat", "--session", "s", "--message", "hi", "--temperature", "nan", "--store", db,
                              env=NO_MODEL), 2, "temperature")
    _one_error_line(_deltamem("chat", "--session", "s", "--message", "hi", "--protocol", "authors", "--mode",
                              "windowed", "--store", db, env=NO_MODEL), 2, "--protocol authors runs in --mode online")
    _one_error_line(_deltamem("chat", "--session", "s", "--message", "hi", "--store", "mysql://u@h/db",
                              env=NO_MODEL), 2, "unsupported database")
    notadb = tmp_path / "notadb.db"
    notadb.write_text("hello, not a database\n")
    _one_error_line(_deltamem("chat", "--session", "s", "--message", "hi", "--store", str(notadb), env=NO_MODEL),
                    1, "not an SQLite database")
    _one_error_line(_deltamem("sessions", "list", "--store", str(notadb)), 1, "not an SQLite database")
    assert notadb.read_text() == "hello, not a database\n"


def test_unreachable_postgresql_is_one_line(tmp_path):
    url = f"postgresql://postgres@127.0.0.1:{_free_port()}/nothing"
    for argv in (("sessions", "list", "--store", url), ("db", "upgrade", "--url", url),
                 ("chat", "--session", "s", "--message", "hi", "--store", url)):
        _one_error_line(_deltamem(*argv, env=NO_MODEL), 1, "cannot reach the session database", "127.0.0.1")


def test_debug_shows_the_traceback(tmp_path):
    notadb = tmp_path / "notadb.db"
    notadb.write_text("x")  # shorter than SQLite's header: SQLite alone would overwrite it
    for out in (_deltamem("sessions", "list", "--store", str(notadb), env={"DELTAMEM_DEBUG": "1"}),
                _deltamem("-v", "sessions", "list", "--store", str(notadb))):
        assert out.returncode == 1 and "Traceback" in out.stderr
        assert out.stderr.strip().splitlines()[-1].startswith("error: ")
    assert notadb.read_text() == "x"


def _read_only_dir(path):
    """``(path, wrap)``: a directory the ``deltamem`` subprocess cannot write, and how to wrap its command line.
    Permission bits for an ordinary user; root ignores them, so for root a read-only bind mount in a private
    mount namespace (``unshare -m``; skipped where that is not allowed)."""
    import shutil

    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        return path, None
    if shutil.which("unshare") is None:
        pytest.skip("running as root without unshare: no way to make a read-only directory")
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'

    def wrap(argv):
        return ["unshare", "-m", "sh", "-c", script, str(path), *argv]

    probe = subprocess.run(wrap(["sh", "-c", f"touch {path}/probe"]), capture_output=True, text=True)
    if probe.returncode == 0 or "Read-only" not in probe.stderr:
        pytest.skip(f"cannot make a read-only directory here: {probe.stderr.strip()}")
    return path, wrap


def test_read_only_cache_dir_is_one_line(tmp_path):
    ro, wrap = _read_only_dir(tmp_path / "ro-cache")
    env = {"DELTAMEM_CACHE_DIR": str(ro), "DELTAMEM_MODEL_DIR": None}
    fetch = _deltamem("model", "fetch", "--quiet", env=env, wrap=wrap)
    _one_error_line(fetch, 1, str(ro))
    # chat: the default store lives in the cache dir: refused before the model loads (the model is not there)
    _one_error_line(_deltamem("chat", "--session", "s", "--message", "hi", env=env, wrap=wrap), 1, "sessions.db")
    # with a writable store, the default KV cache directory (in the cache dir) is the problem
    _one_error_line(_deltamem("chat", "--session", "s", "--message", "hi", "--store", str(tmp_path / "s.db"),
                              env=env, wrap=wrap), 1, "kv-cache", "--kv-cache-dir none")
    assert list(ro.iterdir()) == []


@pytest.mark.embedded
def test_importing_another_adapters_file_is_one_line(embedded, tmp_path):
    """``sessions import`` of a file written with another adapter: one line, exit 1, nothing created."""
    from deltamem_agents.adapter import DeltaMemConfig, attach, save_adapter
    from deltamem_agents.engine import MemoryEngine

    model, tokenizer = embedded
    dm = attach(model, DeltaMemConfig(write_mode="ssw"))
    try:
        save_adapter(dm, tmp_path / "ssw-adapter")
    finally:
        dm.detach_adapter()
    engine = MemoryEngine(embedded, adapter=str(tmp_path / "ssw-adapter"), store=f"sqlite:///{tmp_path}/a.db")
    try:
        engine.write("s", [{"role": "user", "content": "hello"}])
        path = engine.export_session("s", tmp_path / "s.safetensors")
    finally:
        engine.close()
        engine.model.detach_adapter()
    db = tmp_path / "b.db"
    out = _deltamem("sessions", "import", str(path), "--adapter", "none", "--store", str(db))
    _one_error_line(out, 1, "was written with model", "adapter")
    listed = _deltamem("sessions", "list", "--store", str(db), "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == []
