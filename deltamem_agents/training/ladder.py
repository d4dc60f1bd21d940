"""The memory ladder: fast mechanism-check training of a δ-mem adapter, with diagnostics (issue "2 of 6").

Rungs (see ``docs/training.md``):

* ``L0``: one fact turn (user statement + assistant acknowledgement), no distractors, then the question;
* ``L1``: the same with ``distractors`` small-talk turns between fact and question (a curriculum over the list,
  advancing when held-out accuracy reaches ``advance_at``);
* ``L2``: the synthetic dialogues of level 3 (several facts, updates where the latest wins, held-out phrasings).

Why this trainer is fast (and what it assumes): the adapter is trained with ``steer_writes=False``, so a writing
call runs the frozen base unchanged. The write pass then needs the base's hidden states only, computed once under
``no_grad`` for every message of every context as the rows of one batch — each message on its own from position 0,
exactly as the windowed engine writes it (``ChatRenderer.message_ids``, one call per message, no text context) —
and only the cheap memory projections and the delta-rule scan over each context's concatenated messages carry
autograd. The read pass (``[system, question] + answer``, writes off) back-propagates through the layers above
the lowest wrapped one. :func:`write_contexts` is tested against per-message forward calls of the model.

Every evaluation logs: state-only 4-way choice accuracy on held-out values (never seen in training) with the real
state, a zeroed state (= the base model) and a corrupted one (another context's state); the answer loss under the
same three; the retention ``Π λ`` across the gap between the fact and the question; β on the fact message vs the
other messages.

Run: ``python -m deltamem_agents.training.ladder --out runs/l0 --rung L0 --update-rule delta --steps 2000``.
Data parallel: the same under ``torchrun --nproc-per-node N`` (detected from the environment): every rank writes
and reads its share of each step's contexts, the loss is normalised by the global answer-token count and the
gradients are summed (:mod:`.distributed`); rank 0 evaluates, logs and saves, and its curriculum level is shared.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..adapter import DeltaMemConfig, DeltaMemModel, attach, save_adapter
from ..adapter.segments import plan_segments
from ..adapter.state import DeltaMemState
from ..extras import pyplot
from .collate import IGNORE, encode_prompt_answer, pad_read
from .config import DEFAULT_SYSTEM_PROMPT
from .data.synthetic import _SMALL_TALK, synthetic_group
from .distributed import DistributedContext, from_environment
from .examples import MemoryExample
from .gates import wrapped_q_projs

__all__ = [
    "RECALL_QUESTION",
    "RUNGS",
    "LadderConfig",
    "LadderRun",
    "WrittenContexts",
    "answer_logprobs",
    "ladder_example",
    "main",
    "normalize_message",
    "plot_runs",
    "read_logits",
    "write_contexts",
]


def normalize_message(message: dict[str, str], position: int):
    from ..engine.messages import normalize_message as _normalize

    return _normalize(message, position)

RUNGS = ("L0", "L1", "L2")
RECALL_QUESTION = "Repeat exactly what I told you before."


@dataclass
class LadderConfig:
    """One ladder run. Adapter options are passed to :class:`DeltaMemConfig` (``steer_writes`` is always False)."""

    rung: str = "L0"
    distractors: tuple[int, ...] = (0,)
    advance_at: float = 0.8
    steps: int = 2000
    contexts_per_step: int = 16
    lr: float = 1e-3
    gate_lr: float = 1e-2
    weight_decay: float = 0.0
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    recon_frac: float = 0.0
    eval_every: int = 100
    eval_n: int = 200
    seed: int = 0
    time_budget_s: float | None = None
    num_threads: int | None = None
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    adapter: dict[str, Any] = field(default_factory=lambda: {"update_rule": "delta", "write_mode": "tsw"})

    def __post_init__(self) -> None:
        if self.rung not in RUNGS:
            raise ValueError(f"rung must be one of {RUNGS}, got {self.rung!r}")
        self.distractors = tuple(self.distractors)
        if not self.distractors or any(not isinstance(d, int) or d < 0 for d in self.distractors):
            raise ValueError(f"distractors must be non-negative ints, got {self.distractors!r}")
        for name in ("steps", "contexts_per_step", "eval_every", "eval_n"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("lr", "gate_lr", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.recon_frac <= 1.0:
            raise ValueError(f"recon_frac must be in [0, 1], got {self.recon_frac!r}")
        if not 0.0 < self.advance_at <= 1.0:
            raise ValueError(f"advance_at must be in (0, 1], got {self.advance_at!r}")
        self.adapter_config()  # validate the adapter options now

    def adapter_config(self) -> DeltaMemConfig:
        return DeltaMemConfig.from_dict({**self.adapter, "steer_writes": False})


# -- data ---------------------------------------------------------------------------------------------------------
def ladder_example(index: int, *, split: str, rung: str, distractors: int, seed: int = 0) -> MemoryExample:
    """One example of ``rung`` (a pure function of its arguments): L0/L1 = one fact turn, ``distractors``
    small-talk turns, the question; L2 = a level-3 synthetic dialogue's first question."""
    if rung == "L2":
        return synthetic_group(index, split=split, seed=seed, level=3, questions_per_context=1)[0]
    ex = synthetic_group(index, split=split, seed=seed, level=0, questions_per_context=1)[0]
    rng = random.Random(f"ladder:{seed}:{split}:{index}:{distractors}")
    talk = [m for q, a in (rng.choice(_SMALL_TALK) for _ in range(distractors))
            for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    meta = {**ex.meta, "n_distractors": distractors, "rung": rung}
    return MemoryExample(id=f"{ex.id}-d{distractors}", task=ex.task, history=ex.history + talk,
                         question=ex.question, answers=ex.answers, choices=ex.choices, evidence=ex.evidence, meta=meta)


def _swap_value(ex: MemoryExample) -> MemoryExample:
    """``ex`` with its answer value replaced, in the history, by the first other choice (the counterfactual)."""
    gold = ex.answers[0]
    other = next(c for c in ex.choices if c != gold)
    history = [{**m, "content": m["content"].replace(gold, other)} for m in ex.history]
    return MemoryExample(id=ex.id + "-swap", task=ex.task, history=history, question=ex.question, answers=[other],
                         choices=ex.choices, evidence=ex.evidence, meta=ex.meta)


# -- the fast write pass ------------------------------------------------------------------------------------------
@dataclass
class WrittenContexts:
    """What :func:`write_contexts` returns: the state ``(B rows)`` with autograd to the adapter, and for the
    diagnostics each wrapped layer's base hidden states ``x (B, T, d)``, the token mask ``(B, T)`` and each
    token's message index ``(B, T)`` (−1 on padding)."""

    state: DeltaMemState
    hidden: list[Tensor]
    mask: Tensor
    message_index: Tensor


def write_contexts(dm: DeltaMemModel, contexts: Sequence[Sequence[Sequence[int]]], pad_id: int) -> WrittenContexts:
    """Write each context (a list of messages, each a list of token ids) into a fresh state row.

    Equivalent to one ``dm(message)`` call per message, in order, from a zero state (positions from 0, writes on)
    for an adapter with ``steer_writes=False`` — but the base runs once, without autograd, on all messages.
    """
    if dm.config.steer_writes:
        raise ValueError("write_contexts needs an adapter with steer_writes=False (writes must not steer the base)")
    messages = [list(m) for ctx in contexts for m in ctx]
    if not messages or any(not m for m in messages):
        raise ValueError("every context needs at least one message and every message at least one token")
    device = next(dm.delta_layers.parameters()).device
    R, T = len(messages), max(len(m) for m in messages)
    ids = torch.full((R, T), pad_id, dtype=torch.long)
    attn = torch.zeros(R, T, dtype=torch.long)
    for i, m in enumerate(messages):
        ids[i, : len(m)] = torch.tensor(m)
        attn[i, : len(m)] = 1
    captured: dict[int, Tensor] = {}
    targets = wrapped_q_projs(dm)
    handles = [q.register_forward_hook(lambda mod, args, out, slot=s: captured.__setitem__(slot, args[0]))
               for s, (_, q) in enumerate(targets)]
    try:
        with torch.no_grad(), dm.memory_disabled():
            dm.base_model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()

    # Concatenate each context's messages (real tokens only) along time.
    lengths = [sum(len(m) for m in ctx) for ctx in contexts]
    B, L = len(contexts), max(lengths)
    gather = torch.zeros(B, L, dtype=torch.long)  # flat index into (R·T)
    mask = torch.zeros(B, L, dtype=torch.bool)
    msg_index = torch.full((B, L), -1, dtype=torch.long)
    row = 0
    for b, ctx in enumerate(contexts):
        t = 0
        for j, m in enumerate(ctx):
            n = len(m)
            gather[b, t : t + n] = row * T + torch.arange(n)
            mask[b, t : t + n] = True
            msg_index[b, t : t + n] = j
            t += n
            row += 1
    gather, mask, msg_index = gather.to(device), mask.to(device), msg_index.to(device)
    hidden = []
    state = dm.new_state(B)
    plan = None
    if dm.config.write_mode == "ssw":
        plan = plan_segments(msg_index.clamp_min(0), mask, state.last_segment, state.pending_count)
    for slot, (layer, _) in enumerate(targets):
        x = captured[slot].reshape(R * T, -1)[gather.reshape(-1)].view(B, L, -1)
        hidden.append(x)
        memory = state.memory[slot]
        if plan is None:
            _, state.memory[slot] = layer.token_write(x, memory, mask)
        else:
            _, state.memory[slot], state.pending_sum[slot] = layer.sequence_write(
                x, memory, state.pending_sum[slot], plan)
    if plan is not None:
        state.pending_count = plan.counts.gather(1, plan.last_slot[:, None])[:, 0]
        state.last_segment = plan.last_segment
    return WrittenContexts(state, hidden, mask, msg_index)


# -- read pass and scoring ----------------------------------------------------------------------------------------
def read_logits(dm: DeltaMemModel, state: DeltaMemState, owners: Sequence[int], rows: list[tuple[list[int], list[int]]],
                pad_id: int) -> tuple[Tensor, Tensor]:
    """Read pass (writes off) of ``rows`` (prompt ids, answer ids), row ``i`` reading state row ``owners[i]``.
    Returns ``(logits (R, K, V), labels (R, K))`` for the last ``K`` positions (answer tokens labelled)."""
    device = next(dm.delta_layers.parameters()).device
    batch = pad_read(rows, pad_id, device)
    dm.set_state(state.select(list(owners)))
    with dm.writes_disabled():
        logits = dm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                    use_cache=False, logits_to_keep=batch.keep).logits
    return logits, batch.labels[:, -batch.keep :]


def answer_logprobs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row summed log-probability of the labelled tokens and their count. ``logits (R, K, V)``."""
    targets = labels[:, 1:]
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    valid = targets != IGNORE
    tok = logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0] * valid
    return tok.sum(1), valid.sum(1)


# -- the run ------------------------------------------------------------------------------------------------------
class LadderRun:
    """Trains ``dm`` (an adapter with ``steer_writes=False``) on the rung of ``config``; logs to ``out_dir``."""

    def __init__(self, config: LadderConfig, dm: DeltaMemModel, tokenizer: Any, out_dir: str | Path,
                 distributed: DistributedContext | None = None) -> None:
        from ..engine.rendering import ChatRenderer

        self.config, self.dm, self.tokenizer = config, dm, tokenizer
        self.dist = distributed
        self.out_dir = Path(out_dir)
        self.renderer = ChatRenderer(tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        gates, rest = [], []
        for name, p in dm.delta_layers.named_parameters():
            (gates if name.rsplit(".", 1)[-1] in ("beta_bias", "lambda_bias", "lambda_proj", "wide_gain") else rest).append(p)
        self.params = gates + rest
        if distributed is not None:
            distributed.check_batch(config.contexts_per_step)
            distributed.broadcast_parameters(self.params)
        # Gates at their own, higher lr and without weight decay: with a shared small lr they barely move.
        self.optimizer = torch.optim.AdamW([{"params": rest, "lr": config.lr, "weight_decay": config.weight_decay},
                                            {"params": gates, "lr": config.gate_lr, "weight_decay": 0.0}])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / (config.warmup_steps + 1)))
        self.step = 0
        self.level = 0
        self.questions_seen = 0
        self.train_seconds = 0.0
        self._zero_cache: dict[int, tuple[int, float]] = {}

    # -- encoding -------------------------------------------------------------------------------------------
    def _messages_ids(self, ex: MemoryExample) -> list[list[int]]:
        msgs = ([{"role": "system", "content": self.config.system_prompt}] if self.config.system_prompt else [])
        return [self.renderer.message_ids(normalize_message(m, i)) for i, m in enumerate(msgs + ex.history)]

    def _prompt(self, question: str) -> list[dict[str, str]]:
        sys = [{"role": "system", "content": self.config.system_prompt}] if self.config.system_prompt else []
        return sys + [{"role": "user", "content": question}]

    def _examples(self, start: int, n: int, split: str, distractors: int) -> list[MemoryExample]:
        c = self.config
        return [ladder_example(i, split=split, rung=c.rung, distractors=distractors, seed=c.seed)
                for i in range(start, start + n)]

    # -- training -------------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        c = self.config
        d = c.distractors[self.level]
        exs = self._examples(self.step * c.contexts_per_step, c.contexts_per_step, "train", d)
        rng = random.Random(f"recon:{c.seed}:{self.step}")
        rows = []
        for e in exs:  # every rank draws for every example, so the choices do not depend on the sharding
            if c.recon_frac and rng.random() < c.recon_frac:  # ask for the fact turn back: CE on every token
                rows.append(encode_prompt_answer(self.tokenizer, self._prompt(RECALL_QUESTION),
                                                 e.history[e.evidence[0]]["content"]))
            else:
                rows.append(encode_prompt_answer(self.tokenizer, self._prompt(e.question), e.answers[0]))
        if self.dist is not None:  # this rank's share of the contexts
            exs, rows = self.dist.shard(exs), self.dist.shard(rows)
        written = write_contexts(self.dm, [self._messages_ids(e) for e in exs], self.pad_id)
        logits, labels = read_logits(self.dm, written.state, list(range(len(exs))), rows, self.pad_id)
        lp, n = answer_logprobs(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        if self.dist is None:
            loss = -(lp.sum() / n.sum().clamp_min(1))
            loss.backward()
        else:  # normalised by the global token count: the summed gradients are the whole batch's
            total = self.dist.sum([lp.sum(), n.sum()])
            n_all = max(float(total[1]), 1.0)
            (-(lp.sum() / n_all)).backward()
            loss = -total[0] / n_all
            self.dist.sum_gradients(self.params)
        self.dm.reset_state(1)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.questions_seen += c.contexts_per_step
        return {"loss": float(loss.detach()), "grad_norm": grad_norm}

    # -- evaluation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, distractors: int) -> dict[str, float]:
        """Held-out diagnostics at ``distractors`` (see the module docstring).

        The 4-way choice is scored with the real state and with a zero state (the base model, which does not
        change during training and is computed once per distractor count). The gold answer's loss also with a
        corrupted state (another context's: mostly another slot, so real < corrupt can be the slot's answer
        format alone) and with a **swapped** one (the same dialogue with another choice's value written: only the
        value differs, so real < swap is value-specific content)."""
        c = self.config
        exs = self._examples(10_000_000, c.eval_n, "heldout", distractors)
        zero_cached = self._zero_cache.get(distractors)
        correct = {"state": 0, "zero": 0}
        loss = {"state": 0.0, "zero": 0.0, "corrupt": 0.0, "swap": 0.0}
        n_tok = 0
        beta_fact, beta_other, log_keep = [], [], []
        chunk = 25
        for s in range(0, len(exs), chunk):
            part = exs[s : s + chunk]
            written = write_contexts(self.dm, [self._messages_ids(e) for e in part], self.pad_id)
            swapped = write_contexts(self.dm, [self._messages_ids(_swap_value(e)) for e in part], self.pad_id)
            self._gate_stats(part, written, beta_fact, beta_other, log_keep)
            B = len(part)
            rows, owners, gold_rows = [], [], []
            for i, e in enumerate(part):
                gold_rows.append(len(rows) + e.choices.index(e.answers[0]))
                for choice in e.choices:
                    rows.append(encode_prompt_answer(self.tokenizer, self._prompt(e.question), choice))
                    owners.append(i)
            scored = [("state", written.state, rows, owners)]
            if zero_cached is None:
                scored.append(("zero", self.dm.new_state(B), rows, owners))
            corrupt_rows = [rows[g] for g in gold_rows]
            scored.append(("corrupt", written.state, corrupt_rows, [(i + 1) % B for i in range(B)]))
            scored.append(("swap", swapped.state, corrupt_rows, list(range(B))))
            for name, st, rr, own in scored:
                logits, labels = read_logits(self.dm, st, own, rr, self.pad_id)
                lp, n = answer_logprobs(logits, labels)
                if name in ("corrupt", "swap"):
                    loss[name] += -float(lp.sum())
                    continue
                lp, n = lp.view(B, -1), n.view(B, -1)
                for i, e in enumerate(part):
                    gold = e.choices.index(e.answers[0])
                    correct[name] += int(int(lp[i].argmax()) == gold)
                    loss[name] += -float(lp[i, gold])
                    if name == "state":
                        n_tok += int(n[i, gold])
        self.dm.reset_state(1)
        N = len(exs)
        if zero_cached is None:
            zero_cached = self._zero_cache[distractors] = (correct["zero"], loss["zero"])
        correct["zero"], loss["zero"] = zero_cached
        out: dict[str, float] = {"distractors": distractors, "n": N}
        for name in correct:
            acc = correct[name] / N
            out[f"acc_{name}"] = acc
            out[f"se_{name}"] = math.sqrt(max(acc * (1 - acc), 1e-12) / N)
        for name in loss:
            out[f"answer_nll_{name}"] = loss[name] / max(n_tok, 1)
        out["beta_fact"] = float(torch.stack(beta_fact).mean()) if beta_fact else float("nan")
        out["beta_other"] = float(torch.stack(beta_other).mean()) if beta_other else float("nan")
        out["retention_gap"] = float(torch.stack(log_keep).mean().exp()) if log_keep else float("nan")
        return out

    @torch.no_grad()
    def general_ability(self) -> dict[str, float]:
        """Perplexity of reference answers to short general questions (``data.general.GENERAL_QA``, no history): the
        plain model, a fresh state (exactly the plain model by construction), and a state into which an unrelated
        ~1,000-token conversation was written message by message as the windowed engine writes it."""
        from .data.general import GENERAL_QA, long_conversation

        rows = [encode_prompt_answer(self.tokenizer, self._prompt(q), a) for q, a in GENERAL_QA]
        conv = MemoryExample(id="general", task="general", history=long_conversation(), question="", answers=[""])
        ids = self._messages_ids(conv)
        written = write_contexts(self.dm, [ids], self.pad_id)

        def ppl(state: DeltaMemState | None) -> float:
            if state is None:
                with self.dm.memory_disabled():
                    logits, labels = read_logits(self.dm, self.dm.new_state(len(rows)), range(len(rows)), rows,
                                                 self.pad_id)
            else:
                logits, labels = read_logits(self.dm, state, [0] * len(rows), rows, self.pad_id)
            lp, n = answer_logprobs(logits, labels)
            return math.exp(-float(lp.sum()) / int(n.sum()))

        plain, fresh, after = ppl(None), ppl(self.dm.new_state(1)), ppl(written.state)
        self.dm.reset_state(1)
        return {"general_ppl_plain": plain, "general_ppl_fresh": fresh, "general_ppl_after_conversation": after,
                "conversation_tokens": sum(len(m) for m in ids),
                "general_change_fresh_pct": 100 * (fresh / plain - 1),
                "general_change_after_pct": 100 * (after / plain - 1)}

    def _gate_stats(self, exs, written: WrittenContexts, beta_fact, beta_other, log_keep) -> None:
        """β on the fact message vs the rest; Π λ (geometric mean over rows, layers) over tokens after the fact."""
        system = 1 if self.config.system_prompt else 0
        fact = torch.tensor([e.evidence[0] + system for e in exs], device=written.mask.device)[:, None]
        is_fact = written.message_index == fact
        after = (written.message_index > fact) & written.mask
        other = written.mask & ~is_fact
        for (layer, _), x in zip(wrapped_q_projs(self.dm), written.hidden, strict=True):
            _, _, _, beta = layer.split(layer.project(x), x)  # (B, L, N, r or d)
            lam = layer.retention(x, beta)
            lam = (1 - beta) if lam is None else lam
            b = beta.mean(dim=(2, 3))
            if is_fact.any():
                beta_fact.append(b[is_fact].mean())
            if other.any():
                beta_other.append(b[other].mean())
            log_lam = torch.log(lam.clamp_min(1e-30)).mean(dim=(2, 3))
            log_keep.append((log_lam * after).sum(1).mean())

    # -- loop -----------------------------------------------------------------------------------------------
    def run(self) -> Path:
        c = self.config
        if c.num_threads:
            torch.set_num_threads(c.num_threads)
        torch.manual_seed(c.seed)
        main = self.dist is None or self.dist.is_main  # rank 0 evaluates, logs and saves
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "ladder_config.json").write_text(json.dumps(asdict(c), indent=2))
        log = (self.out_dir / "ladder_log.jsonl").open("a") if main else None
        best = -1.0

        def record(rec: dict[str, Any]) -> None:
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), flush=True)

        if main:
            ev = self.evaluate(c.distractors[self.level])
            record({"step": 0, "questions_seen": 0, "train_seconds": 0.0, "level": self.level, **ev})
        losses: list[float] = []
        while self.step < c.steps:
            t0 = time.perf_counter()
            losses.append(self.train_step()["loss"])
            self.train_seconds += time.perf_counter() - t0
            out_of_time = c.time_budget_s is not None and self.train_seconds >= c.time_budget_s
            if self.dist is not None and c.time_budget_s is not None:
                out_of_time = self.dist.any(out_of_time)
            if (self.step % c.eval_every == 0 or self.step == c.steps or out_of_time) and main:
                ev = self.evaluate(c.distractors[self.level])
                rec = {"step": self.step, "questions_seen": self.questions_seen,
                       "train_seconds": round(self.train_seconds, 1),
                       "questions_per_s": round(self.questions_seen / max(self.train_seconds, 1e-9), 2),
                       "train_loss": sum(losses) / len(losses), "level": self.level, **ev}
                losses = []
                record(rec)
                score = ev["acc_state"] + self.level  # later levels rank above earlier ones
                if score > best:
                    best = score
                    self.save(self.out_dir / "best")
                if ev["acc_state"] >= c.advance_at and self.level + 1 < len(c.distractors):
                    self.level += 1  # curriculum: advance on held-out accuracy, not on a schedule
                    record({"step": self.step, "advance_to_distractors": c.distractors[self.level]})
            if self.dist is not None and (self.step % c.eval_every == 0 or self.step == c.steps or out_of_time):
                self.level = int(self.dist.sum([self.level if main else 0])[0])  # rank 0's curriculum decision
            if out_of_time:
                break
        final = self.out_dir / "adapter"
        if main:
            log.close()
            self.save(final)
        if self.dist is not None:
            self.dist.barrier()
        return final

    def save(self, directory: Path) -> Path:
        meta = {"recipe": "ladder", "ladder_config": asdict(self.config), "step": self.step,
                "questions_seen": self.questions_seen, "train_seconds": round(self.train_seconds, 1),
                "level": self.level}
        return save_adapter(self.dm, directory, training=meta)


def plot_runs(logs: dict[str, Path], png: Path, title: str = "") -> None:
    """Held-out state-only accuracy (±2 SE) against training questions, one line per run; zero-state dashed."""
    plt = pyplot("train", "the ladder's accuracy plot")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, path in logs.items():
        recs = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
        recs = [r for r in recs if "acc_state" in r]
        if not recs:
            continue
        x = [r["questions_seen"] for r in recs]
        y = [r["acc_state"] for r in recs]
        se = [2 * r["se_state"] for r in recs]
        (line,) = ax.plot(x, y, marker=".", label=label)
        ax.fill_between(x, [a - b for a, b in zip(y, se, strict=True)], [a + b for a, b in zip(y, se, strict=True)],
                        color=line.get_color(), alpha=0.15)
        ax.plot(x, [r["acc_zero"] for r in recs], ls="--", lw=0.8, color=line.get_color())
    ax.axhline(0.25, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("training questions seen")
    ax.set_ylabel("held-out 4-way accuracy (state only)")
    ax.set_title(title or "δ-mem ladder: real state (solid, ±2 SE) vs zero state (dashed)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deltamem_agents.training.ladder", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="embedded")
    p.add_argument("--rung", default="L0", choices=RUNGS)
    p.add_argument("--distractors", default="0", help="comma-separated curriculum, e.g. 1,2,4,8")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--contexts-per-step", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--gate-lr", type=float, default=1e-2)
    p.add_argument("--recon-frac", type=float, default=0.0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--time-budget-s", type=float, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adapter", default='{"update_rule": "delta"}', help="DeltaMemConfig options as JSON")
    p.add_argument("--init", metavar="ADAPTER_DIR", default=None,
                   help="start from this trained adapter (its config replaces --adapter), e.g. the best of a lower rung")
    p.add_argument("--evaluate", metavar="ADAPTER_DIR", default=None,
                   help="only evaluate this trained adapter at each --distractors count (JSON lines to --out)")
    a = p.parse_args(argv)
    if a.evaluate:
        return _evaluate_only(a)
    config = LadderConfig(
        rung=a.rung, distractors=tuple(int(x) for x in a.distractors.split(",")), steps=a.steps,
        contexts_per_step=a.contexts_per_step, lr=a.lr, gate_lr=a.gate_lr, recon_frac=a.recon_frac,
        eval_every=a.eval_every, eval_n=a.eval_n, time_budget_s=a.time_budget_s, num_threads=a.threads,
        seed=a.seed, adapter=json.loads(a.adapter))
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    from ..models import load_base_model

    dist = from_environment()  # a data-parallel rank under torchrun
    device = dist.device if dist is not None and dist.device.type == "cuda" else None
    model, tok = load_base_model(None if a.model == "embedded" else a.model, device=device)
    if a.init:
        from ..adapter import load_adapter

        dm = load_adapter(model, a.init)
        config = LadderConfig(**{**asdict(config), "adapter": dm.config.to_dict()})
    else:
        dm = attach(model, config.adapter_config())
    LadderRun(config, dm, tok, a.out, distributed=dist).run()
    if dist is None or dist.is_main:
        plot_runs({Path(a.out).name: Path(a.out) / "ladder_log.jsonl"}, Path(a.out) / "ladder_curve.png")
    return 0


def _evaluate_only(a: argparse.Namespace) -> int:
    from ..adapter import load_adapter
    from ..models import load_base_model

    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = load_base_model() if a.model == "embedded" else load_base_model(a.model)
    dm = load_adapter(model, a.evaluate)
    config = LadderConfig(rung=a.rung, distractors=tuple(int(x) for x in a.distractors.split(",")),
                          eval_n=a.eval_n, seed=a.seed, adapter=dm.config.to_dict())
    run = LadderRun(config, dm, tok, a.out)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "evaluation.jsonl").open("a") as f:
        for d in config.distractors:
            rec = {"adapter": str(a.evaluate), "rung": a.rung, **run.evaluate(d)}
            f.write(json.dumps(rec) + "\n")
            print(json.dumps(rec), flush=True)
        rec = {"adapter": str(a.evaluate), **run.general_ability()}
        f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
