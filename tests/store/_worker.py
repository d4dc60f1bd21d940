"""A separate OS process that writes to a store, for the concurrency tests (run as a script).

    python _worker.py increment URL NAMESPACE SESSION WORKER N READY_FILE GO_FILE
        N read-modify-commit loops, retrying on ConcurrentUpdateError; each commit appends one record with
        digest "wWORKER-i" at the next index. Prints "done RETRIES".
    python _worker.py hammer URL NAMESPACE SESSION MAX_SNAPSHOTS
        (MAX_SNAPSHOTS 0: keep every turn.)
        Commits forever as fast as it can (until killed); prints "turn K" after each commit.
"""

from __future__ import annotations

import os
import sys
import time

from deltamem_agents.store import (
    ConcurrentUpdateError,
    SQLSessionStore,
    TensorBlob,
    WindowMessage,
    WrittenMessage,
)


def state_for(turn: int) -> list[TensorBlob]:
    """A state whose bytes encode the turn, so a reader can tell which turn it belongs to."""
    data = turn.to_bytes(8, "little") * 32  # 256 bytes = float32 (1, 8, 8)
    return [TensorBlob("layer0", "float32", (1, 8, 8), data), TensorBlob("layer1", "int64", (32,), data)]


def increment(url: str, ns: str, sid: str, worker: int, n: int, ready: str, go: str) -> None:
    store = SQLSessionStore(url)
    open(ready, "w").close()
    while not os.path.exists(go):  # start together, so the loops really overlap
        time.sleep(0.005)
    retries = 0
    for i in range(n):
        while True:
            data = store.load(sid, namespace=ns)
            index = data.record.count
            try:
                store.commit(
                    sid, namespace=ns, expected_version=data.info.version, state=state_for(data.turn + 1),
                    written=[WrittenMessage(index, "user", f"w{worker}-{i}", 1)],
                    window=[WindowMessage(index, "user", f"from {worker}", 1)],
                )
                break
            except ConcurrentUpdateError:
                retries += 1
    store.close()
    print(f"done {retries}", flush=True)


def hammer(url: str, ns: str, sid: str, max_snapshots: int) -> None:
    store = SQLSessionStore(url, max_snapshots=max_snapshots or None)
    info = store.get(sid, namespace=ns)
    while True:
        turn = info.turn + 1
        info = store.commit(
            sid, namespace=ns, expected_version=info.version, state=state_for(turn),
            written=[WrittenMessage(turn - 1, "user", f"m{turn}", 1)],
            window=[WindowMessage(turn - 1, "user", "x" * 2000, 1)],
        )
        print(f"turn {info.turn}", flush=True)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "increment":
        url, ns, sid, worker, n, ready, go = args
        increment(url, ns, sid, int(worker), int(n), ready, go)
    elif command == "hammer":
        url, ns, sid, max_snapshots = args
        hammer(url, ns, sid, int(max_snapshots))
    else:
        raise SystemExit(f"unknown command {command!r}")
