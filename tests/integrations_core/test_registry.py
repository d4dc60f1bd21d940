"""The engine registry: one engine per configuration per process, shared, thread-safe, closed explicitly or at
exit. Most tests stand a recording class in for ``MemoryEngine`` (the registry's own logic); one loads a real
model directory, and one checks in a child process that an engine still open at exit is closed."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from deltamem_agents import engine as engine_package
from deltamem_agents.integrations import clear_engines, engine_key, get_engine, registered_engines

pytestmark = pytest.mark.usefixtures("clean_registry")


class RecordingEngine:
    """Records how it was built and whether it was closed. The constructor of the model named ``held`` sets
    ``entered`` and then waits for ``gate``: a build that takes long, observably."""

    built: list[RecordingEngine] = []
    held: str | None = None
    entered = threading.Event()
    gate = threading.Event()

    def __init__(self, model=None, **kwargs):
        if model is not None and model == RecordingEngine.held:
            RecordingEngine.entered.set()
            assert RecordingEngine.gate.wait(timeout=120), "the test never opened the gate"
        self.model_arg, self.kwargs, self.closed = model, kwargs, 0
        RecordingEngine.built.append(self)

    def close(self):
        self.closed += 1


@pytest.fixture
def recording(monkeypatch):
    RecordingEngine.built, RecordingEngine.held = [], None
    RecordingEngine.entered, RecordingEngine.gate = threading.Event(), threading.Event()
    monkeypatch.setattr(engine_package, "MemoryEngine", RecordingEngine)
    yield RecordingEngine
    RecordingEngine.gate.set()  # never leave a thread waiting


def test_key_normalises_paths_and_keys_store_objects_by_identity(tmp_path):
    assert engine_key(tmp_path, "none", "sqlite:///x.db") == engine_key(str(tmp_path), "none", "sqlite:///x.db")
    assert engine_key(None, None, "sqlite:///x.db") != engine_key(None, None, "sqlite:///y.db")
    assert engine_key(window_tokens=256) != engine_key(window_tokens=1024)
    assert engine_key(mode="windowed") != engine_key(mode="online")
    assert engine_key(kv_cache_dir=tmp_path) == engine_key(kv_cache_dir=str(tmp_path))
    store_a, store_b = object(), object()
    assert engine_key(store=store_a) == engine_key(store=store_a) != engine_key(store=store_b)
    with pytest.raises(TypeError, match="not hashable"):
        engine_key(device=["cpu"])


def test_one_engine_per_configuration(recording):
    a = get_engine(None, adapter="none", store="sqlite:///a.db")
    assert get_engine(None, adapter="none", store="sqlite:///a.db") is a
    b = get_engine(None, adapter="none", store="sqlite:///b.db")
    c = get_engine(None, adapter="none", store="sqlite:///a.db", mode="windowed")
    assert len({id(a), id(b), id(c)}) == 3 and len(recording.built) == 3
    assert c.kwargs == {"adapter": "none", "store": "sqlite:///a.db", "window_tokens": 1024, "mode": "windowed"}
    assert set(map(id, registered_engines())) == {id(a), id(b), id(c)}


def test_concurrent_first_calls_build_one_engine(recording):
    """Eight threads ask for the same configuration at once while its build is held open: exactly one engine
    is built and every thread gets it."""
    recording.held = "some/model"
    barrier = threading.Barrier(9)
    results: list[object] = []
    errors: list[BaseException] = []

    def ask():
        try:
            barrier.wait(timeout=60)
            results.append(get_engine("some/model", store="sqlite:///shared.db"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    barrier.wait(timeout=60)
    assert recording.entered.wait(timeout=60)  # one thread is building; the others ask meanwhile
    recording.gate.set()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) == 8
    assert len(recording.built) == 1 and all(r is recording.built[0] for r in results)


def test_building_one_engine_does_not_hold_up_another(recording):
    """While configuration A's build is held open, configuration B is built and returned: the lock that
    serialises builds is per configuration."""
    recording.held = "model-a"
    got_a: list[object] = []
    slow = threading.Thread(target=lambda: got_a.append(get_engine("model-a")))
    slow.start()
    assert recording.entered.wait(timeout=60)
    got_b: list[object] = []
    fast = threading.Thread(target=lambda: got_b.append(get_engine("model-b")))
    fast.start()
    fast.join(timeout=60)  # a guard against a hang, not a timing assertion: B does not wait for A at all
    assert got_b and got_b[0].model_arg == "model-b"
    assert slow.is_alive() and not got_a  # A is still being built
    recording.gate.set()
    slow.join(timeout=60)
    assert got_a and got_a[0].model_arg == "model-a"


def test_a_failed_build_registers_nothing(monkeypatch):
    calls = []

    class Failing:
        def __init__(self, *args, **kwargs):
            calls.append(1)
            raise FileNotFoundError("no such model")

    monkeypatch.setattr(engine_package, "MemoryEngine", Failing)
    for _ in range(2):  # the second call tries again rather than finding a broken entry
        with pytest.raises(FileNotFoundError):
            get_engine("/nowhere/model")
    assert len(calls) == 2 and registered_engines() == []


def test_clear_engines_closes_each_once_and_survives_a_failing_close(recording):
    a, b = get_engine("model-a"), get_engine("model-b")

    def broken_close():
        raise RuntimeError("disk gone")

    a.close = broken_close
    clear_engines()
    assert b.closed == 1 and registered_engines() == []
    clear_engines()  # nothing left: nothing closed twice
    assert b.closed == 1
    c = get_engine("model-c")
    clear_engines(close=False)
    assert c.closed == 0 and registered_engines() == []
    assert get_engine("model-c") is not c  # forgotten: a new one is built


def test_a_real_engine_by_path_is_shared(tiny_model_dir, tmp_path):
    store = f"sqlite:///{tmp_path / 's.db'}"
    engine = get_engine(tiny_model_dir, adapter="none", store=store, max_new_tokens=2)
    assert get_engine(str(tiny_model_dir), adapter="none", store=store, max_new_tokens=2) is engine
    assert engine.model_name == "tiny-llama"  # the directory's name, never the path
    result = engine.chat("reg", [{"role": "user", "content": "Hi"}])
    assert result.turn == 1 and result.usage.completion_tokens <= 2


def test_an_engine_left_open_is_closed_at_exit(tiny_model_dir, tmp_path):
    """A child process uses a registered engine in online mode with a KV cache directory and exits without
    closing it: the registry's exit hook closes the engine, which saves the session's hot KV cache to the
    directory (a file appears there only through ``MemoryEngine.close``)."""
    kv_dir = tmp_path / "kv"
    script = (
        "import sys\n"
        "from deltamem_agents.integrations import get_engine\n"
        "e = get_engine(sys.argv[1], adapter='none', store=sys.argv[2], kv_cache_dir=sys.argv[3], "
        "max_new_tokens=2)\n"
        "e.chat('atexit', [{'role': 'user', 'content': 'Hello'}], mode='online')\n"
        "print('before exit:', sum(1 for _ in __import__('pathlib').Path(sys.argv[3]).rglob('*') if _.is_file()))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script, str(tiny_model_dir), f"sqlite:///{tmp_path / 's.db'}",
                           str(kv_dir)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "before exit: 0" in proc.stdout  # nothing saved while the engine was open
    assert [p for p in kv_dir.rglob("*") if p.is_file()], "the exit hook did not close the engine"
