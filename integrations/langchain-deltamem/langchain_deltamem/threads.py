"""Keep LangGraph threads and δ-mem sessions in step.

In a graph with a checkpointer, :class:`~langchain_deltamem.ChatDeltaMem` uses the run's ``thread_id`` as its
session id, so a thread has two halves: the checkpoints (the graph's state: messages and the rest) and the δ-mem
session (the memory the model wrote). Deleting or copying one without the other leaves a thread whose model
remembers a conversation its checkpoints no longer hold (or the reverse). These helpers do both halves:

.. code-block:: python

    threads = DeltaMemThreads(checkpointer, llm)       # llm: a ChatDeltaMem (or a MemoryEngine)
    threads.copy("main", "experiment")                  # checkpoints copied, session forked
    threads.delete("experiment")                        # checkpoints and session deleted

Checkpointers that implement ``copy_thread`` are asked to copy; for the others (``InMemorySaver`` and
``SqliteSaver`` in langgraph-checkpoint 4.x do not) the checkpoints are copied one by one, oldest first, with their
pending writes, through the public ``list``/``put``/``put_writes`` methods.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from typing import Any

from deltamem_agents.engine import SessionNotFoundError

__all__ = ["DeltaMemThreads", "acopy_thread", "adelete_thread", "copy_thread", "delete_thread"]

logger = logging.getLogger(__name__)


def _engine_and_namespace(engine: Any, namespace: str | None) -> tuple[Any, str | None]:
    """Accept a MemoryEngine or a ChatDeltaMem (whose engine and namespace are used)."""
    if hasattr(engine, "get_engine") and not hasattr(engine, "fork"):
        if namespace is None:
            namespace = getattr(engine, "namespace", None)
        engine = engine.get_engine()
    return engine, namespace


def _thread_config(thread_id: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread_id}}


def _target_config(tup: Any, target: str) -> dict[str, Any]:
    conf = {"thread_id": target, "checkpoint_ns": tup.config["configurable"].get("checkpoint_ns", "")}
    parent = tup.parent_config
    if parent and parent.get("configurable", {}).get("checkpoint_id"):
        conf["checkpoint_id"] = parent["configurable"]["checkpoint_id"]
    return {"configurable": conf}


def _grouped_writes(tup: Any) -> dict[str, list[tuple[str, Any]]]:
    groups: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    for task_id, channel, value in tup.pending_writes or []:
        groups[task_id].append((channel, value))
    return groups


def _copy_checkpoints(checkpointer: Any, source: str, target: str) -> None:
    try:
        checkpointer.copy_thread(source, target)
        return
    except NotImplementedError:
        pass
    tuples = list(checkpointer.list(_thread_config(source)))
    for tup in reversed(tuples):  # ``list`` is newest first; parents must exist before their children
        new_config = checkpointer.put(_target_config(tup, target), tup.checkpoint, tup.metadata,
                                      tup.checkpoint.get("channel_versions", {}))
        for task_id, writes in _grouped_writes(tup).items():
            checkpointer.put_writes(new_config, writes, task_id)


async def _acopy_checkpoints(checkpointer: Any, source: str, target: str) -> None:
    try:
        await checkpointer.acopy_thread(source, target)
        return
    except NotImplementedError:
        pass
    tuples = [t async for t in checkpointer.alist(_thread_config(source))]
    for tup in reversed(tuples):
        new_config = await checkpointer.aput(_target_config(tup, target), tup.checkpoint, tup.metadata,
                                             tup.checkpoint.get("channel_versions", {}))
        for task_id, writes in _grouped_writes(tup).items():
            await checkpointer.aput_writes(new_config, writes, task_id)


def delete_thread(checkpointer: Any, engine: Any, thread_id: str, *, namespace: str | None = None) -> bool:
    """Delete a thread's checkpoints and its δ-mem session (state, snapshots, record and window).

    ``engine`` is a :class:`~deltamem_agents.MemoryEngine` or a :class:`~langchain_deltamem.ChatDeltaMem`;
    ``checkpointer`` may be ``None`` (the session only). Returns whether a δ-mem session existed.
    """
    engine, namespace = _engine_and_namespace(engine, namespace)
    if checkpointer is not None:
        checkpointer.delete_thread(thread_id)
    try:
        engine.delete(thread_id, namespace=namespace)
    except SessionNotFoundError:
        return False
    return True


async def adelete_thread(checkpointer: Any, engine: Any, thread_id: str, *, namespace: str | None = None) -> bool:
    """:func:`delete_thread` with the checkpointer's async methods (the engine call runs in a worker thread)."""
    import asyncio

    engine, namespace = _engine_and_namespace(engine, namespace)
    if checkpointer is not None:
        await checkpointer.adelete_thread(thread_id)
    try:
        await asyncio.to_thread(engine.delete, thread_id, namespace=namespace)
    except SessionNotFoundError:
        return False
    return True


def copy_thread(checkpointer: Any, engine: Any, source: str, target: str, *, namespace: str | None = None) -> bool:
    """Copy a thread: fork its δ-mem session to ``target`` and copy its checkpoints to ``target``.

    The session is forked first; if copying the checkpoints fails, the fork is deleted again. A thread whose
    model has not been called yet has no session: only its checkpoints are copied. Returns whether a session
    was forked.
    """
    engine, namespace = _engine_and_namespace(engine, namespace)
    try:
        engine.fork(source, target, namespace=namespace)
        forked = True
    except SessionNotFoundError:
        forked = False
    if checkpointer is not None:
        try:
            _copy_checkpoints(checkpointer, source, target)
        except BaseException:
            if forked:
                with contextlib.suppress(Exception):
                    engine.delete(target, namespace=namespace)
            raise
    return forked


async def acopy_thread(checkpointer: Any, engine: Any, source: str, target: str, *,
                       namespace: str | None = None) -> bool:
    """:func:`copy_thread` with the checkpointer's async methods (the engine calls run in a worker thread)."""
    import asyncio

    engine, namespace = _engine_and_namespace(engine, namespace)
    try:
        await asyncio.to_thread(engine.fork, source, target, namespace=namespace)
        forked = True
    except SessionNotFoundError:
        forked = False
    if checkpointer is not None:
        try:
            await _acopy_checkpoints(checkpointer, source, target)
        except BaseException:
            if forked:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(engine.delete, target, namespace=namespace)
            raise
    return forked


class DeltaMemThreads:
    """A checkpointer and an engine (or a :class:`~langchain_deltamem.ChatDeltaMem`) managed together.

    Args:
        checkpointer: a LangGraph checkpointer (``InMemorySaver``, ``SqliteSaver``, ``PostgresSaver``…) or None.
        engine: a :class:`~deltamem_agents.MemoryEngine` or a :class:`~langchain_deltamem.ChatDeltaMem`.
        namespace: the sessions' namespace (default: the chat model's, else the engine's).
    """

    def __init__(self, checkpointer: Any, engine: Any, *, namespace: str | None = None) -> None:
        self.checkpointer = checkpointer
        self.engine, self.namespace = _engine_and_namespace(engine, namespace)

    def delete(self, thread_id: str) -> bool:
        """Delete the thread's checkpoints and session; see :func:`delete_thread`."""
        return delete_thread(self.checkpointer, self.engine, thread_id, namespace=self.namespace)

    def copy(self, source: str, target: str) -> bool:
        """Copy the thread's checkpoints and fork its session; see :func:`copy_thread`."""
        return copy_thread(self.checkpointer, self.engine, source, target, namespace=self.namespace)

    async def adelete(self, thread_id: str) -> bool:
        return await adelete_thread(self.checkpointer, self.engine, thread_id, namespace=self.namespace)

    async def acopy(self, source: str, target: str) -> bool:
        return await acopy_thread(self.checkpointer, self.engine, source, target, namespace=self.namespace)

    def exists(self, thread_id: str) -> bool:
        """Whether the thread has a δ-mem session."""
        try:
            self.engine.get_session(thread_id, namespace=self.namespace)
        except SessionNotFoundError:
            return False
        return True
