"""Running the arms side by side on the same examples, with the same model and the same token budget.

Arms (design brief §5):

=================  ==========================================================  ==============
arm                prompt text                                                 memory
=================  ==========================================================  ==============
``none``           system + question                                           off
``window``         system + the most recent ``W`` tokens of history + question  off
``full``           system + all history (oldest dropped at the context limit)  off
``bm25``           system + best BM25 messages within ``W`` tokens + question  off
``deltamem``       as ``window``                                               reads a state holding every
                                                                               message, written once
``deltamem-online`` as ``full``                                                written as tokens pass
=================  ==========================================================  ==============

Arms run one after another (so each arm's wall time and peak memory are its own); within an arm, questions
that share a history share its work: the prompt prefix (system + history text) runs once and is cached, the
δ-mem state is written once, and the BM25 index is built once.

Evidence rule: the window of ``W`` tokens is computed per history; an example whose evidence all lies before it
is ``"outside"`` (only memory can answer in the windowed arms), one with evidence inside the window is
``"inside"``, one without evidence annotation ``"unknown"``. Every arm's results are reported per split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..resources import ResourceMonitor
from ..training.examples import MemoryExample
from .lm import LanguageModel, Prefix
from .metrics import exact_match, label_match, locomo_f1, match_score, normalize_text
from .prompts import PromptRenderer
from .retrieval import Bm25Index
from .tasks import EvalTask
from .windows import evidence_position, window_start

__all__ = ["ARM_NAMES", "MEMORY_ARMS", "WINDOWED_ARMS", "ArmCost", "EvalConfig", "EvalRun", "Record", "evaluate", "parse_arms"]

log = logging.getLogger(__name__)

ARM_NAMES = ("none", "window", "full", "bm25", "deltamem", "deltamem-online")
MEMORY_ARMS = frozenset({"deltamem", "deltamem-online"})
#: Arms whose text is limited to the window budget ``W`` (the evidence rule is about them).
WINDOWED_ARMS = frozenset({"window", "bm25", "deltamem"})


def parse_arms(spec: str | Sequence[str]) -> list[str]:
    """``"none,window"`` or a list → validated arm names in the order given, without duplicates."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [n for n in names if n not in ARM_NAMES]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; choose from {', '.join(ARM_NAMES)}")
    if not names:
        raise ValueError("no arms given")
    return list(dict.fromkeys(names))


@dataclass
class EvalConfig:
    """Budget and decoding settings shared by every arm.

    Attributes:
        window_tokens: ``W``, the text budget of the windowed arms (``window``, ``bm25``, ``deltamem``).
        max_new_tokens: greedy answer length limit.
        context_tokens: the model's context limit for ``full``/``deltamem-online`` (``None``: from the model).
        bm25_k: at most this many retrieved messages (``None``: as many as fit in ``W``).
        choice_score: ``"mean"`` (mean log-prob per token, the default: options of different lengths are
            compared fairly, where a sum favours short options) or ``"sum"`` (the total log-likelihood).
        write_chunk_tokens: tokens per forward call of the δ-mem write pass.
        seed: seeds the bootstrap (and anything random in loaders).
        confidence: level of the reported intervals.
        progress: show a progress bar per arm.
    """

    window_tokens: int = 1024
    max_new_tokens: int = 32
    context_tokens: int | None = None
    bm25_k: int | None = None
    choice_score: str = "mean"
    write_chunk_tokens: int = 2048
    seed: int = 0
    confidence: float = 0.95
    progress: bool = True

    def __post_init__(self) -> None:
        if self.window_tokens < 0:
            raise ValueError("window_tokens must be >= 0")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.choice_score not in ("mean", "sum"):
            raise ValueError("choice_score must be 'mean' or 'sum'")
        if self.bm25_k is not None and self.bm25_k < 1:
            raise ValueError("bm25_k must be >= 1 (or None)")


@dataclass
class Record:
    """One arm's answer to one example."""

    example_id: str
    arm: str
    evidence: str
    score: float
    prediction: str
    answers: list[str]
    prompt_tokens: int
    seconds: float
    category: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ArmCost:
    """Cost of one arm over all its examples."""

    arm: str
    answers: int
    wall_s: float
    prompt_tokens_per_answer: float
    processed_tokens_per_answer: float
    rss_start_mib: float
    peak_rss_mib: float
    memory_method: str
    peak_cuda_mib: float | None = None


@dataclass
class EvalRun:
    """Everything one evaluation produced (``report.write_report`` turns it into files)."""

    task: str
    metric: str
    score_kind: str
    config: EvalConfig
    arms: list[str]
    records: list[Record]
    costs: list[ArmCost]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task, "metric": self.metric, "score_kind": self.score_kind, "config": asdict(self.config),
            "arms": self.arms, "costs": [asdict(c) for c in self.costs], "meta": self.meta,
            "records": [asdict(r) for r in self.records],
        }  # fmt: skip


# -- groups of examples sharing a history ----------------------------------------------------------------------
@dataclass
class _Group:
    system: str
    history: list[dict[str, str]]
    examples: list[MemoryExample]
    message_ids: list[list[int]]
    lengths: list[int]


def _history_key(system: str, history: Sequence[dict[str, str]]) -> str:
    h = hashlib.sha256(system.encode())
    h.update(json.dumps([[m["role"], m["content"]] for m in history], ensure_ascii=False).encode())
    return h.hexdigest()


def _groups(task: EvalTask, renderer: PromptRenderer) -> list[_Group]:
    groups: dict[str, _Group] = {}
    by_identity: dict[tuple[int, str], str] = {}
    for ex in task.examples:
        system = ex.meta.get("system") or task.system_prompt
        ident = (id(ex.history), system)  # loaders often share one list per history: skip the hash then
        key = by_identity.get(ident)
        if key is None:
            key = by_identity[ident] = _history_key(system, ex.history)
        if key not in groups:
            ids = renderer.history_ids(ex.history)
            groups[key] = _Group(system, ex.history, [], ids, [len(i) for i in ids])
        groups[key].examples.append(ex)
    return list(groups.values())


def _concat(parts: Sequence[Sequence[int]]) -> list[int]:
    out: list[int] = []
    for p in parts:
        out.extend(p)
    return out


# -- scoring ----------------------------------------------------------------------------------------------------
def score_answer(task: EvalTask, example: MemoryExample, prediction: str) -> tuple[float, dict[str, Any]]:
    """Score a generated answer by the task's metric; returns (score, extra details)."""
    if task.metric == "locomo":
        category = int(example.meta.get("category", 4))
        s = locomo_f1(prediction, example.answer, category, example.meta.get("answer_key"))
        return s, {}
    if task.metric == "label":
        return label_match(prediction, example.answers), {}
    if task.metric == "match":
        return match_score(prediction, example.answers), {"exact": exact_match(prediction, example.answers)}
    raise ValueError(f"unknown metric {task.metric!r}")


# -- the arms ---------------------------------------------------------------------------------------------------
class _ArmRunner:
    """Runs one arm over the groups; per-group work (prefix, state, index) is done once."""

    def __init__(self, arm: str, lm: LanguageModel, renderer: PromptRenderer, task: EvalTask, cfg: EvalConfig):
        self.arm, self.lm, self.renderer, self.task, self.cfg = arm, lm, renderer, task, cfg
        self.context_tokens = cfg.context_tokens or lm.context_tokens

    def _reserve(self, group: _Group) -> int:
        """Tokens kept free after the history: the longest question, then the answer or the longest choice."""
        longest_q = max(len(self.renderer.question_ids(ex.question)) for ex in group.examples)
        longest_c = max(
            (len(self.renderer.answer_ids(c)) for ex in group.examples for c in (ex.choices or [])), default=0
        )
        return longest_q + max(self.cfg.max_new_tokens, longest_c + 1)

    def run_group(self, group: _Group, sink: list[Record], bar: Any = None) -> None:
        cfg, lm = self.cfg, self.lm
        sys_ids = self.renderer.system_ids(group.system)
        w_start = window_start(group.lengths, cfg.window_tokens)
        full_budget = max(0, self.context_tokens - len(sys_ids) - self._reserve(group))
        f_start = window_start(group.lengths, full_budget)
        index = None
        arm = self.arm
        if arm == "none":
            prefix = lm.prefix(sys_ids)
        elif arm == "window":
            prefix = lm.prefix(sys_ids + _concat(group.message_ids[w_start:]))
        elif arm == "full":
            prefix = lm.prefix(sys_ids + _concat(group.message_ids[f_start:]))
        elif arm == "bm25":
            prefix = lm.prefix(sys_ids)
            index = Bm25Index([m["content"] for m in group.history])
        elif arm == "deltamem":
            state = lm.write_history(group.message_ids, cfg.write_chunk_tokens)
            prefix = lm.prefix(sys_ids + _concat(group.message_ids[w_start:]), mode="read", state=state)
        elif arm == "deltamem-online":
            prefix = lm.prefix(sys_ids + _concat(group.message_ids[f_start:]), mode="write")
        else:  # pragma: no cover - parse_arms validates names
            raise ValueError(arm)
        for ex in group.examples:
            sink.append(self._answer(ex, group, prefix, index, w_start))
            if bar is not None:
                bar.update(1)

    def _answer(self, ex: MemoryExample, group: _Group, prefix: Prefix, index: Bm25Index | None, w_start: int) -> Record:
        t0 = time.perf_counter()
        q_ids = self.renderer.question_ids(ex.question)
        suffix = q_ids
        extra: dict[str, Any] = {}
        if index is not None:
            query = ex.meta.get("question_raw") or ex.question
            chosen = index.select(query, group.lengths, self.cfg.window_tokens, self.cfg.bm25_k)
            suffix = _concat([group.message_ids[i] for i in chosen]) + q_ids
            extra["retrieved"] = chosen
            if ex.evidence:
                extra["evidence_retrieved"] = sum(e in chosen for e in ex.evidence) / len(ex.evidence)
        if ex.choices:
            choice_ids = [self.renderer.answer_ids(c) for c in ex.choices]
            lps = self.lm.choice_logprobs(prefix, suffix, choice_ids)
            values = [s / n if self.cfg.choice_score == "mean" else s for s, n in lps]
            pick = max(range(len(values)), key=values.__getitem__)
            prediction = ex.choices[pick]
            gold = {normalize_text(a) for a in ex.answers}
            score = float(normalize_text(prediction) in gold)
            extra["choice_scores"] = [round(v, 4) for v in values]
        else:
            prediction, _ = self.lm.generate(prefix, suffix, self.cfg.max_new_tokens)
            score, more = score_answer(self.task, ex, prediction)
            extra.update(more)
        category = ex.meta.get("category_name") or (str(ex.meta["category"]) if "category" in ex.meta else None)
        return Record(
            example_id=ex.id, arm=self.arm, evidence=evidence_position(ex.evidence, w_start), score=score,
            prediction=prediction, answers=list(ex.answers), prompt_tokens=prefix.length + len(suffix),
            seconds=time.perf_counter() - t0, category=category, extra=extra,
        )  # fmt: skip


def evaluate(
    task: EvalTask,
    lm: LanguageModel,
    arms: Sequence[str],
    config: EvalConfig | None = None,
    *,
    meta: dict[str, Any] | None = None,
) -> EvalRun:
    """Run ``arms`` on every example of ``task`` with one model; see the module docstring.

    ``lm`` must carry a δ-mem adapter when a memory arm is asked for. Returns an :class:`EvalRun` holding one
    :class:`Record` per (arm, example) and one :class:`ArmCost` per arm.
    """
    import torch

    cfg = config or EvalConfig()
    arms = parse_arms(arms)
    missing = [a for a in arms if a in MEMORY_ARMS and not lm.has_memory]
    if missing:
        raise ValueError(f"arm(s) {missing} need a δ-mem adapter, but the model has none")
    if not task.examples:
        raise ValueError(f"task {task.name!r} has no examples")
    torch.manual_seed(cfg.seed)
    renderer = PromptRenderer(lm.tokenizer)
    groups = _groups(task, renderer)
    records: list[Record] = []
    costs: list[ArmCost] = []
    for arm in arms:
        runner = _ArmRunner(arm, lm, renderer, task, cfg)
        arm_records: list[Record] = []
        processed_before = lm.tokens_processed
        bar = _progress(len(task.examples), arm, cfg.progress)
        with ResourceMonitor() as monitor:
            for group in groups:
                runner.run_group(group, arm_records, bar)
        if bar is not None:
            bar.close()
        usage = monitor.usage
        n = len(arm_records)
        costs.append(
            ArmCost(
                arm=arm, answers=n, wall_s=usage.wall_s,
                prompt_tokens_per_answer=sum(r.prompt_tokens for r in arm_records) / n,
                processed_tokens_per_answer=(lm.tokens_processed - processed_before) / n,
                rss_start_mib=usage.rss_start_mib, peak_rss_mib=usage.peak_rss_mib, memory_method=usage.method,
                peak_cuda_mib=usage.peak_cuda_mib,
            )  # fmt: skip
        )
        log.info("arm %s: %d answers in %.1fs", arm, n, usage.wall_s)
        records.extend(arm_records)
    info = {
        "examples": len(task.examples),
        "choice_examples": sum(1 for ex in task.examples if ex.choices),
        "histories": len(groups),
        **(meta or {}),
    }
    return EvalRun(task.name, task.metric, task.score_kind, cfg, list(arms), records, costs, info)


def _progress(total: int, arm: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{arm:>15}", unit="q", leave=True)
