"""The public surface, pinned: the ``__all__`` of the package, of every public subpackage and of both
integration packages is listed here name by name, so an accidental change (a name dropped, renamed or added)
fails this test and has to be made on purpose. Every name in every ``__all__`` resolves; every public module
has an ``__all__``; every error class the package defines derives from
:class:`~deltamem_agents.errors.DeltaMemError` and keeps its built-in base."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import deltamem_agents
from deltamem_agents.errors import DeltaMemError

#: module -> its ``__all__``, space-separated and sorted.
PUBLIC = {
    "deltamem_agents": (
        "DeltaMemConfig DeltaMemError DeltaMemModel DeltaMemState MemoryEngine __version__ attach "
        "import_official_adapter load_adapter save_adapter"
    ),
    "deltamem_agents.errors": (
        "DeltaMemError"
    ),
    "deltamem_agents.adapter": (
        "ARCHITECTURES AdapterMismatchError ArchitectureSpec DeltaMemConfig DeltaMemLayer DeltaMemModel "
        "DeltaMemState KERNELS KernelUnavailableError OfficialTensorError UnsupportedArchitectureError "
        "UnsupportedOfficialConfigError "
        "adapter_fingerprint attach base_model_fingerprint config_from_official fresh_adapter "
        "import_official_adapter load_adapter read_adapter_metadata resolve_adapter resolve_architecture "
        "save_adapter"
    ),
    "deltamem_agents.engine": (
        "ChatChunk ChatResult ConcurrentUpdateError ContextLengthError CorruptStateError DEFAULT_SAMPLING "
        "EngineError FingerprintMismatchError HistoryConflictError InvalidMessageError InvalidOptionError "
        "InvalidStateError KVCacheStats MODES MemoryEngine Message MessageTooLongError PROTOCOLS PortableFormatError "
        "SamplingParams SessionExistsError SessionNotFoundError TooManyMessagesError Usage WriteResult "
        "normalize_messages"
    ),
    "deltamem_agents.engine.errors": (
        "ConcurrentUpdateError ContextLengthError CorruptStateError EngineError FingerprintMismatchError "
        "HistoryConflictError InvalidMessageError InvalidOptionError InvalidStateError MessageTooLongError "
        "PortableFormatError SessionExistsError SessionNotFoundError TooManyMessagesError"
    ),
    "deltamem_agents.store": (
        "ALLOWED_DTYPES AsyncSQLSessionStore AsyncSessionStore ConcurrentUpdateError CorruptSessionError "
        "CorruptStateError DEFAULT_NAMESPACE IDENTIFIER_PATTERN ITEMSIZE InvalidIdentifierError "
        "InvalidStoreURLError RecordSummary SQLSessionStore SchemaVersionError SessionData SessionExistsError SessionInfo SessionNotFoundError "
        "SessionStats SessionStore StorageFullError StoreError StoreUnavailableError TensorBlob TurnInfo "
        "WindowMessage WrittenMessage current_version default_sqlite_path latest_version normalize_url "
        "open_async_store open_store sha256_hex upgrade upgrade_database validate_identifier"
    ),
    "deltamem_agents.store.errors": (
        "ConcurrentUpdateError CorruptSessionError CorruptStateError InvalidIdentifierError InvalidStoreURLError "
        "SchemaVersionError SessionExistsError SessionNotFoundError StorageFullError StoreError "
        "StoreUnavailableError"
    ),
    "deltamem_agents.models": (
        "EMBEDDED_MODEL EmbeddedModelIntegrityError EmbeddedModelSpec EmbeddedModelUnavailable cache_dir "
        "display_name embedded_model_dir eos_token_ids fetch_embedded_model load_base_model "
        "load_embedded_model resolve_model"
    ),
    "deltamem_agents.server": (
        "APIError APIKey KeyStore ServerConfigError ServerSettings Tenant build_engine create_app run_server"
    ),
    "deltamem_agents.training": (
        "ContextStream MemoryExample TrainConfig Trainer build_model get_recipe latest_checkpoint "
        "list_recipes list_tasks load_task train"
    ),
    "deltamem_agents.training.data": (
        "BENCHMARKS_ENV MAX_LEVEL SLOT_NAMES TASKS curriculum_level list_tasks load_babi load_banking77 "
        "load_task sample_value synthetic_dialogues synthetic_group value_split"
    ),
    "deltamem_agents.evaluation": (
        "ARM_NAMES ArmCost Bm25Index ConversationFormatError EvalConfig EvalRun EvalTask LanguageModel "
        "MEMORY_ARMS Prefix Record TASK_NAMES WINDOWED_ARMS bootstrap_ci contains_match evaluate "
        "evidence_position exact_match label_match load_conversation_jsonl load_eval_task load_locomo "
        "locomo_f1 locomo_normalize locomo_token_f1 match_score normalize_text parse_arms summarize token_f1 "
        "wilson_interval window_start write_report"
    ),
    "deltamem_agents.evaluation.tasks": (
        "ConversationFormatError EvalTask TASK_NAMES load_conversation_jsonl load_eval_task load_locomo"
    ),
    "deltamem_agents.integrations": (
        "EMBEDDED_MODEL_NAME EPHEMERAL_PREFIX EngineKey GenerationDefaults NoToolCallError ROLE_ALIASES "
        "SessionTarget ToolCallingUnsupportedError check_tool_calling clear_engines close_ephemeral_engine "
        "engine_key engine_message engine_role ephemeral_engine generation_options get_engine "
        "make_ephemeral_engine new_ephemeral_id openai_tool_call registered_engines result_metadata "
        "served_model_name supports_tool_calls text_from_parts usage_metadata"
    ),
    "deltamem_agents.ops": (
        "delta_rule_chunked delta_rule_chunked_shared_gate delta_rule_reference delta_rule_step delta_rule_triton "
        "delta_rule_triton_affine"
    ),
    "deltamem_agents.benchmarks": "",
    "deltamem_agents.assets": "",
    "langchain_deltamem": (
        "ChatDeltaMem DeltaMemThreads EMBEDDED_MODEL_NAME __version__ acopy_thread adelete_thread "
        "clear_engines copy_thread delete_thread get_engine thread_id_from_config"
    ),
    "llama_index.llms.deltamem": (
        "DeltaMemLLM EMBEDDED_MODEL_NAME NoToolCallError ToolCallingUnsupportedError clear_engines "
        "current_session get_engine session_scope"
    ),
}

INTEGRATIONS = ("langchain_deltamem", "llama_index.llms.deltamem")

#: Errors re-based onto DeltaMemError with the built-in base ``except`` clauses relied on before.
BUILTIN_BASES = {
    "deltamem_agents.engine.errors.InvalidMessageError": ValueError,
    "deltamem_agents.engine.errors.InvalidOptionError": ValueError,
    "deltamem_agents.engine.errors.InvalidStateError": ValueError,
    "deltamem_agents.engine.errors.PortableFormatError": ValueError,
    "deltamem_agents.store.errors.InvalidIdentifierError": ValueError,
    "deltamem_agents.store.errors.SessionNotFoundError": KeyError,
    "deltamem_agents.models.embedded_spec.EmbeddedModelUnavailable": RuntimeError,
    "deltamem_agents.models.kv_cache.CacheNotUsedError": RuntimeError,
    "deltamem_agents.server.serve.ServerConfigError": RuntimeError,
    "deltamem_agents.server.keys.KeyNotFoundError": LookupError,
    "deltamem_agents.evaluation.tasks.conversation.ConversationFormatError": ValueError,
    "deltamem_agents.adapter.io.AdapterMismatchError": ValueError,
    "deltamem_agents.adapter.official.UnsupportedOfficialConfigError": ValueError,
    "deltamem_agents.adapter.official.OfficialTensorError": ValueError,
    "deltamem_agents.adapter.architectures.UnsupportedArchitectureError": ValueError,
    "deltamem_agents.adapter.kernel_choice.KernelUnavailableError": RuntimeError,
    "deltamem_agents.ops.triton_support.TritonUnavailableError": RuntimeError,
    "deltamem_agents.extras.MissingDependencyError": ImportError,
}


def _import(name: str):
    if name.split(".")[0] in {i.split(".")[0] for i in INTEGRATIONS}:
        pytest.importorskip(name)
    return importlib.import_module(name)


def _modules() -> list:
    """Every module of the package (importing each one: none may fail to import)."""
    out = [deltamem_agents]
    for info in pkgutil.walk_packages(deltamem_agents.__path__, "deltamem_agents."):
        out.append(importlib.import_module(info.name))
    return out


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_surface_is_pinned(name):
    module = _import(name)
    assert sorted(module.__all__) == PUBLIC[name].split(), f"{name}.__all__ changed: update PUBLIC on purpose"
    assert len(set(module.__all__)) == len(module.__all__)
    for attr in module.__all__:
        assert getattr(module, attr, None) is not None or attr == "__version__", f"{name}.{attr} does not resolve"


def test_every_public_module_has_an_all_that_resolves():
    missing, unresolved = [], []
    for module in _modules():
        name = module.__name__
        if not hasattr(module, "__all__"):
            missing.append(name)
            continue
        unresolved += [f"{name}.{attr}" for attr in module.__all__ if not hasattr(module, attr)]
    assert not missing, f"public modules without __all__: {missing}"
    assert not unresolved, f"names in __all__ that do not resolve: {unresolved}"


def test_every_error_derives_from_deltamem_error():
    errors = {}
    for module in _modules():
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__.startswith("deltamem_agents"):
                errors[f"{cls.__module__}.{cls.__qualname__}"] = cls
    outside = sorted(n for n, c in errors.items() if not issubclass(c, DeltaMemError))
    assert not outside, f"errors not under DeltaMemError: {outside}"
    assert len(errors) > 30
    for name, base in BUILTIN_BASES.items():
        assert issubclass(errors[name], base) and issubclass(errors[name], DeltaMemError), name


def test_engine_errors_hierarchy():
    from deltamem_agents.engine import (
        ConcurrentUpdateError,
        EngineError,
        HistoryConflictError,
        InvalidOptionError,
    )
    from deltamem_agents.store import StoreError

    assert issubclass(EngineError, DeltaMemError) and issubclass(StoreError, DeltaMemError)
    assert issubclass(HistoryConflictError, ConcurrentUpdateError) and issubclass(HistoryConflictError, EngineError)
    err = InvalidOptionError("seed", "bad seed")
    assert err.option == "seed" and isinstance(err, ValueError) and str(err) == "bad seed"
    assert deltamem_agents.DeltaMemError is DeltaMemError
