"""Concurrency across OS processes: no lost update under contention, and no damage from SIGKILL mid-write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deltamem_agents.store import ConcurrentUpdateError, SQLSessionStore

from ._helpers import new_session

WORKER = Path(__file__).with_name("_worker.py")
REPO = Path(__file__).resolve().parents[2]


def spawn(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(WORKER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)


def test_two_processes_lose_no_update(store, url, ns, tmp_path):
    n = 25
    new_session(store, ns)
    go = tmp_path / "go"
    workers = [spawn("increment", url, ns, "s1", str(w), str(n), str(tmp_path / f"ready{w}"), str(go))
               for w in (1, 2)]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{w}").exists() for w in (1, 2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in workers), "workers did not start"
        time.sleep(0.01)
    go.touch()
    outputs = [p.communicate(timeout=60) for p in workers]
    for p, (out, err) in zip(workers, outputs, strict=True):
        assert p.returncode == 0, err
        assert out.startswith("done")

    data = store.load("s1", namespace=ns, full_record=True)
    expected = sorted(f"w{w}-{i}" for w in (1, 2) for i in range(n))
    assert sorted(m.digest for m in data.written) == expected  # every commit of both processes is there
    assert [m.index for m in data.written] == list(range(2 * n))
    assert data.info.version == 2 * n + 1 and data.turn == 2 * n  # one version per commit, none lost
    assert data.state[0].data[:8] == (2 * n).to_bytes(8, "little")  # the state of the last turn
    assert [t.turn for t in store.list_turns("s1", namespace=ns)] == list(range(2 * n + 1))


def test_threads_lose_no_update(store, ns):
    """The same within one process: threads sharing one store (and its connection pool)."""
    from ._worker import state_for

    new_session(store, ns)
    n, workers = 10, 4

    def loop(worker: int) -> None:
        from deltamem_agents.store import WrittenMessage

        for i in range(n):
            while True:
                data = store.load("s1", namespace=ns)
                try:
                    store.commit("s1", namespace=ns, expected_version=data.info.version,
                                 state=state_for(data.turn + 1),
                                 written=[WrittenMessage(data.record.count, "user", f"w{worker}-{i}", 1)],
                                 window=[])
                    break
                except ConcurrentUpdateError:
                    pass

    threads = [threading.Thread(target=loop, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    data = store.load("s1", namespace=ns, full_record=True)
    assert len({m.digest for m in data.written}) == n * workers
    assert data.info.version == n * workers + 1


@pytest.mark.parametrize("max_snapshots", [None, 4])
def test_sigkill_mid_write_leaves_a_consistent_session(store, url, ns, max_snapshots):
    new_session(store, ns)
    proc = spawn("hammer", url, ns, "s1", str(max_snapshots or 0))
    commits = 0
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while commits < 30:  # let it get going, then kill it wherever it is
            line = proc.stdout.readline()
            assert line, f"writer died: {proc.stderr.read() if proc.stderr else ''}"
            commits += line.startswith("turn ")
            assert time.monotonic() < deadline
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    with SQLSessionStore(url) as fresh:  # a new process-like view: nothing cached
        data = fresh.load("s1", namespace=ns)
        assert data.turn >= commits  # every acknowledged commit is durable
        turns = fresh.list_turns("s1", namespace=ns)
        assert turns[-1].turn == data.turn
        if max_snapshots:
            assert len(turns) <= max_snapshots
        for t in turns:  # every kept turn is whole: state, snapshot, records and window all agree
            snap = fresh.load("s1", namespace=ns, turn=t.turn, full_record=True)
            assert [b.data[:8] for b in snap.state] == [t.turn.to_bytes(8, "little")] * (2 if t.turn else 0)
            assert [m.index for m in snap.written] == list(range(t.turn))
            assert len(snap.window) == (1 if t.turn else 0)
        # And the session keeps working: the killed writer left no lock behind.
        info = fresh.commit("s1", namespace=ns, expected_version=data.info.version, state=[], written=[],
                            window=[])
        assert info.turn == data.turn + 1
