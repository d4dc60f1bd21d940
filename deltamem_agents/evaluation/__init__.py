"""Evaluation: memory arms side by side (design brief §5).

``deltamem eval TASK --data PATH`` runs, on the same examples with the same model and token budget, the arms
``none`` (question only), ``window`` (recent ``W`` tokens), ``full`` (everything, truncated at the context
limit), ``bm25`` (retrieved messages within ``W`` tokens), ``deltamem`` (window + a state holding every message)
and ``deltamem-online`` (everything in the prompt, written as it passes), and reports scores with confidence
intervals split by whether the evidence lies outside the window, plus prompt tokens, wall time and peak memory.

Python use::

    from deltamem_agents.evaluation import EvalConfig, LanguageModel, evaluate, load_eval_task, write_report

    task = load_eval_task("conversation", "my.jsonl")
    run = evaluate(task, LanguageModel(model, tokenizer, memory), ["none", "window", "deltamem"], EvalConfig())
    write_report(run, "out/")
"""

from .lm import LanguageModel, Prefix
from .metrics import (
    bootstrap_ci,
    contains_match,
    exact_match,
    label_match,
    locomo_f1,
    locomo_normalize,
    locomo_token_f1,
    match_score,
    normalize_text,
    token_f1,
    wilson_interval,
)
from .report import summarize, write_report
from .retrieval import Bm25Index
from .runner import (
    ARM_NAMES,
    MEMORY_ARMS,
    WINDOWED_ARMS,
    ArmCost,
    EvalConfig,
    EvalRun,
    Record,
    evaluate,
    parse_arms,
)
from .tasks import (
    TASK_NAMES,
    ConversationFormatError,
    EvalTask,
    load_conversation_jsonl,
    load_eval_task,
    load_locomo,
)
from .windows import evidence_position, window_start

__all__ = [
    "ARM_NAMES",
    "MEMORY_ARMS",
    "TASK_NAMES",
    "WINDOWED_ARMS",
    "ArmCost",
    "Bm25Index",
    "ConversationFormatError",
    "EvalConfig",
    "EvalRun",
    "EvalTask",
    "LanguageModel",
    "Prefix",
    "Record",
    "bootstrap_ci",
    "contains_match",
    "evaluate",
    "evidence_position",
    "exact_match",
    "label_match",
    "load_conversation_jsonl",
    "load_eval_task",
    "load_locomo",
    "locomo_f1",
    "locomo_normalize",
    "locomo_token_f1",
    "match_score",
    "normalize_text",
    "parse_arms",
    "summarize",
    "token_f1",
    "wilson_interval",
    "window_start",
    "write_report",
]
