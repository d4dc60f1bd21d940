"""Shared command-line options of the examples (every example takes ``--store`` and ``--max-new-tokens``)."""

from __future__ import annotations

import argparse


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--store", default=None,
                   help="session store URL, e.g. sqlite:////tmp/demo.db (default: SQLite in the user's cache)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per reply (default 64)")
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=None, help="δ-mem adapter directory, or 'none' (default: the shipped one)")
    return p


def describe(engine, session_id: str) -> str:
    """One line on what a session holds: turns, messages and tokens written, stored state size."""
    from deltamem_agents.engine import SessionNotFoundError

    try:
        s = engine.stats(session_id)
    except SessionNotFoundError:
        return f"session {session_id!r}: does not exist yet"
    return (f"session {session_id!r}: turn {s.info.turn}, {s.written_messages} messages / {s.written_tokens} tokens "
            f"written into a {s.state_bytes}-byte state")
