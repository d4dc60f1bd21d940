"""A client process of the shared-session tests (started with multiprocessing's ``spawn``: a fresh interpreter
that imports this module, builds the tiny model and an engine on the store URL, and runs one client).

Each client sends ``turns`` user messages of its own to one session and reports, in a JSON file, every turn the
engine acknowledged (its ``turn``, ``version``, ``replayed`` flag and the digests of the messages it added) and
every failure (the exception's class name). Two kinds of clients:

* ``"resync"``: the client keeps the shared conversation as it last saw it and sends it whole
  (``history="full"`` or ``"auto"``); after a conflict it reads the conversation back from the session's window
  (the test keeps the whole conversation in the window) and tries again.
* ``"own"``: the client keeps only its own conversation and never re-reads the session (the adversarial case:
  two clients that each believe the session is theirs).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def _engine(url: str, namespace: str, window_tokens: int):
    import torch
    from engine_helpers import make_tiny_dm
    from transformers import AutoTokenizer

    from deltamem_agents.engine import MemoryEngine, SamplingParams
    from deltamem_agents.models import embedded_model_dir
    from deltamem_agents.store import SQLSessionStore

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    return MemoryEngine((make_tiny_dm(), tokenizer), store=SQLSessionStore(url), namespace=namespace,
                        mode="windowed", window_tokens=window_tokens, sampling=SamplingParams(temperature=0.0),
                        kv_cache_bytes=0)


def _window_history(engine, session_id: str) -> list[dict]:
    """The conversation as the session holds it (the test's window holds every message as text)."""
    from deltamem_agents.store import SessionNotFoundError

    try:
        data = engine.store.load(session_id, namespace=engine.namespace)
    except SessionNotFoundError:
        return []
    assert [w.index for w in data.window] == list(range(data.record.count)), "the window must hold everything"
    return [{"role": w.role, "content": w.content} for w in data.window]


def run_client(url: str, namespace: str, session_id: str, name: str, kind: str, style: str, turns: int,
               window_tokens: int, out: str, go: str) -> None:
    """One client: see the module docstring. Writes ``{"acked": [...], "failures": [...]}`` to ``out``."""
    from deltamem_agents.engine import ConcurrentUpdateError, HistoryConflictError
    from deltamem_agents.engine.messages import normalize_message

    engine = _engine(url, namespace, window_tokens)
    Path(out + ".ready").touch()
    while not os.path.exists(go):  # start together, so the calls really overlap
        time.sleep(0.005)
    history: list[dict] = []
    acked: list[dict] = []
    failures: list[str] = []
    sent = 0
    attempts = 0
    while sent < turns and attempts < turns * 20:
        attempts += 1
        user = {"role": "user", "content": f"{name} says {sent}"}
        try:
            result = engine.chat(session_id, [*history, user], history=style, max_new_tokens=2)
        except (HistoryConflictError, ConcurrentUpdateError) as exc:
            failures.append(type(exc).__name__)
            if kind == "resync":
                history = _window_history(engine, session_id)
            continue
        except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
            failures.append(f"{type(exc).__name__}: {exc}")
            continue
        reply = {"role": "assistant", "content": result.text}
        history = [*history, user, reply]
        acked.append({"turn": result.turn, "version": result.version, "replayed": result.replayed,
                      "written": result.written_messages,
                      "digests": [normalize_message(user).digest, normalize_message(reply).digest]})
        sent += 1
    engine.close()
    Path(out).write_text(json.dumps({"acked": acked, "failures": failures}))
