"""LangChain integration of δ-mem: :class:`ChatDeltaMem`, a chat model whose sessions keep a δ-mem state.

>>> from langchain_deltamem import ChatDeltaMem
>>> llm = ChatDeltaMem(session_id="alice", max_tokens=64)
>>> llm.invoke("My name is Alice.").content

See ``docs/integrations/langchain.md`` and ``docs/integrations/langgraph.md``.
"""

from langchain_deltamem.chat_models import EMBEDDED_MODEL_NAME, ChatDeltaMem, thread_id_from_config
from langchain_deltamem.engines import clear_engines, get_engine
from langchain_deltamem.threads import (
    DeltaMemThreads,
    acopy_thread,
    adelete_thread,
    copy_thread,
    delete_thread,
)

__version__ = "0.1.0"

__all__ = [
    "EMBEDDED_MODEL_NAME",
    "ChatDeltaMem",
    "DeltaMemThreads",
    "__version__",
    "acopy_thread",
    "adelete_thread",
    "clear_engines",
    "copy_thread",
    "delete_thread",
    "get_engine",
    "thread_id_from_config",
]
