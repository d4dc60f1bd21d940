"""The δ-mem trainer: frozen backbone, only the δ-mem weights learn.

Offline objective (the paper's), per written context with questions ``q_1..q_Q``:

1. **Write pass** over ``[system] + history`` (chat template, right-padded, writes on, autograd kept through the
   chunked scan). Optionally with the memory's reads steering attention (``reads_in_write_pass``).
2. **Read passes** over ``[system, q_j] + answer_j`` with writes off: the state rows are repeated so the ``Q``
   questions of a context form one batch that reads one state. Cross-entropy on the answer tokens only.
3. Loss = CE + ``w·(mean β − target)²`` with mean β over the write pass; gradients flow from the read pass through
   the state into every write.

Online objective: ``[system] + history + [question] + answer`` as one sequence with writes on; CE on the answer.

Steps are deterministic functions of ``(seed, step)``: the data of step ``s`` is a pure function of its index,
and a checkpoint holds the adapter, the optimizer and scheduler state, the RNG states and the step, so a resumed
run continues bit-for-bit.

Data parallel (``distributed=``, see :mod:`.distributed`): every rank takes its shard of each micro-batch, its loss
terms are normalised by the global counts, and the adapter's gradients are summed over ranks before clipping, so
the step equals the single-process step on the same global batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..adapter import DeltaMemModel, attach, load_adapter, save_adapter
from ..adapter.io import WEIGHTS_NAME
from ..extras import pyplot
from ..files import atomic_directory
from .collate import IGNORE, encode_context, encode_prompt_answer, pad_read, pad_write
from .config import TrainConfig
from .data import curriculum_level, load_task, synthetic_group
from .distributed import DistributedContext
from .examples import MemoryExample
from .gates import WriteGateRecorder, steering_disabled

__all__ = [
    "CHECKPOINT_PREFIX",
    "LOG_NAME",
    "ContextStream",
    "Group",
    "LossParts",
    "Trainer",
    "answer_cross_entropy",
    "build_model",
    "latest_checkpoint",
    "plot_loss",
    "train",
]

CHECKPOINT_PREFIX = "step_"
LOG_NAME = "train_log.jsonl"

Group = list[MemoryExample]


# -- data ---------------------------------------------------------------------------------------------------------
class ContextStream:
    """Training contexts by global index: ``contexts(start, n)`` is a pure function of its arguments.

    ``synthetic``: group ``i`` is generated from the train split with the curriculum level of ``i`` among
    ``total`` contexts. File tasks: the task's train split grouped by ``meta["group"]``, visited in a fresh
    seeded permutation every epoch.
    """

    def __init__(self, config: TrainConfig, total: int) -> None:
        self.config = config
        self.total = total
        self._groups: list[Group] | None = None
        if config.task != "synthetic":
            examples = load_task(config.task, config.data_path, split="train", seed=config.seed)
            groups: list[Group] = []
            for ex in examples:
                key = ex.meta.get("group", ex.id)
                if groups and groups[-1][0].meta.get("group", groups[-1][0].id) == key:
                    groups[-1].append(ex)
                else:
                    groups.append([ex])
            if not groups:
                raise ValueError(f"task {config.task!r} gave no training examples")
            self._groups = [g[: config.questions_per_context] for g in groups]

    def context(self, i: int) -> Group:
        c = self.config
        if self._groups is None:
            level = curriculum_level(i, self.total, c.curriculum, c.seed)
            return synthetic_group(i, split="train", seed=c.seed, level=level,
                                   questions_per_context=c.questions_per_context)
        n = len(self._groups)
        epoch, j = divmod(i, n)
        perm = list(range(n))
        random.Random(f"deltamem-epoch:{c.seed}:{epoch}").shuffle(perm)
        return self._groups[perm[j]]

    def contexts(self, start: int, n: int) -> list[Group]:
        return [self.context(i) for i in range(start, start + n)]


# -- model --------------------------------------------------------------------------------------------------------
def build_model(config: TrainConfig, device: Any = None) -> tuple[DeltaMemModel, Any]:
    """Load the base model of ``config`` (on ``device``; default: CUDA when available) and attach a fresh adapter
    (or ``init_adapter``)."""
    from ..models import load_base_model

    source = None if config.model == "embedded" else config.model
    model, tokenizer = load_base_model(source, device=device)
    dm = load_adapter(model, config.init_adapter) if config.init_adapter else attach(model, config.adapter_config())
    return dm, tokenizer


@dataclass
class LossParts:
    """One micro-batch: ``loss`` (differentiable), and the detached parts for logging."""

    loss: Tensor
    ce: float
    reg: float
    mean_beta: float
    answer_tokens: int
    questions: int


def answer_cross_entropy_sum(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Summed CE over answer tokens and their count. ``logits (R, K, V)`` are the last ``K`` positions;
    ``labels (R, T)``."""
    K = logits.shape[1]
    targets = labels[:, -K:][:, 1:]  # the logit at position t predicts the token at t + 1
    n = int((targets != IGNORE).sum())
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, n


def answer_cross_entropy(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Mean CE over answer tokens. ``logits (R, K, V)`` are the last ``K`` positions; ``labels (R, T)``."""
    loss, n = answer_cross_entropy_sum(logits, labels)
    return loss / max(n, 1), n


@dataclass
class _Forward:
    """One micro-batch's forward: answer logits and labels, the write gates recorded, the question rows."""

    logits: Tensor
    labels: Tensor
    gates: WriteGateRecorder
    questions: int


class Trainer:
    """Trains the δ-mem weights of ``dm`` under ``config``; writes everything under ``out_dir``.

    Layout of ``out_dir``: ``train_config.json``, ``train_log.jsonl``, ``loss_curve.png``,
    ``checkpoints/step_NNNNNN/`` (adapter + ``optimizer.safetensors`` + ``trainer_state.json``), ``adapter/``
    (the final adapter, recipe in its metadata).
    """

    def __init__(
        self, config: TrainConfig, dm: DeltaMemModel, tokenizer: Any, out_dir: str | Path,
        stream: ContextStream | None = None, progress: bool = True,
        distributed: DistributedContext | None = None,
    ) -> None:
        self.config = config
        self.dist = distributed
        self.dm = dm
        self.tokenizer = tokenizer
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.stream = stream or ContextStream(config, config.steps * config.contexts_per_step)
        self.device = next(iter(dm.delta_layers.parameters())).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self.params = [p for p in dm.parameters() if p.requires_grad]
        if distributed is not None:
            distributed.check_batch(config.batch_size)
            distributed.broadcast_parameters(self.params)  # every rank starts from rank 0's adapter
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        warmup = int(config.warmup_frac * config.steps)

        def schedule(step: int) -> float:  # linear warm-up to lr, then cosine to 0
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(config.steps - warmup, 1)))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.step = 0
        self.contexts_seen = 0
        self.questions_seen = 0
        self.elapsed = 0.0
        # The sentinel closes the last history message under SSW (a message is written when the next one starts):
        # the first token of the read prompt, placed in a segment of its own that stays open and is never written.
        self._sentinel = encode_prompt_answer(tokenizer, [{"role": "user", "content": "x"}], None)[0][0]

    # -- losses -----------------------------------------------------------------------------------------------
    def _context_rows(self, groups: list[Group]) -> list[tuple[list[int], list[int]]]:
        c = self.config
        rows = []
        for g in groups:
            ids, seg = encode_context(self.tokenizer, self._system() + g[0].history, c.max_context_tokens - 1)
            rows.append((ids + [self._sentinel], seg + [(seg[-1] + 1) if seg else 0]))
        return rows

    def _system(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.config.system_prompt}] if self.config.system_prompt else []

    def _call(self, batch, *, write: bool, keep: int = 1) -> Tensor:
        kwargs: dict[str, Any] = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                      position_ids=batch.position_ids, use_cache=False, logits_to_keep=keep)
        if write and self.dm.config.write_mode == "ssw" and batch.segment_ids is not None:
            kwargs["segment_ids"] = batch.segment_ids
        return self.dm(**kwargs).logits

    def write_context(self, groups: list[Group]) -> WriteGateRecorder:
        """The write pass: resets the state to ``len(groups)`` rows and writes each group's history."""
        batch = pad_write(self._context_rows(groups), self.pad_id, self.device)
        self.dm.reset_state(len(groups))
        steer = steering_disabled(self.dm) if not self.config.reads_in_write_pass else _null()
        with WriteGateRecorder(self.dm, batch.attention_mask) as gates, steer:
            self._call(batch, write=True, keep=1)  # only the state matters: one position of logits
        return gates

    def offline_loss(self, groups: list[Group]) -> LossParts:
        return self._loss_parts(self._offline_forward(groups))

    def online_loss(self, groups: list[Group]) -> LossParts:
        return self._loss_parts(self._online_forward(groups))

    def _loss_parts(self, fw: _Forward) -> LossParts:
        c = self.config
        ce, n = answer_cross_entropy(fw.logits, fw.labels)
        beta = fw.gates.mean()
        reg = c.beta_reg_weight * (beta - c.beta_target) ** 2
        return LossParts(ce + reg, float(ce.detach()), float(reg.detach()), float(beta.detach()), n, fw.questions)

    def _offline_forward(self, groups: list[Group]) -> _Forward:
        gates = self.write_context(groups)
        state = self.dm.state
        rows, owners = [], []
        for gi, g in enumerate(groups):
            for ex in g:
                rows.append(encode_prompt_answer(self.tokenizer, self._system() + [
                    {"role": "user", "content": ex.question}], ex.answer))
                owners.append(gi)
        # Repeat each context's state once per question (index_select keeps the autograd graph to the writes).
        self.dm.set_state(state.select(owners))
        batch = pad_read(rows, self.pad_id, self.device)
        with self.dm.writes_disabled():
            logits = self._call(batch, write=False, keep=batch.keep)
        return _Forward(logits, batch.labels, gates, len(rows))

    def _online_forward(self, groups: list[Group]) -> _Forward:
        c = self.config
        rows, segs = [], []
        for g in groups:
            for ex in g:
                msgs = self._system() + ex.history + [{"role": "user", "content": ex.question}]
                ctx, seg = encode_context(self.tokenizer, self._system() + ex.history, c.max_context_tokens)
                p_ids, a_ids = encode_prompt_answer(self.tokenizer, msgs, ex.answer)
                if p_ids[: len(ctx)] != ctx:  # template not prefix-stable: one segment for the whole prompt
                    seg = [0] * len(ctx)
                n_q = len(p_ids) - len(ctx)
                last = seg[-1] if seg else -1
                seg = seg + [last + 1] * n_q + [last + 2] * len(a_ids)
                keep = c.max_context_tokens
                rows.append((p_ids[-keep:], a_ids))
                segs.append(seg[-(len(p_ids[-keep:]) + len(a_ids)) :])
        batch = pad_read(rows, self.pad_id, self.device, segments=segs)
        self.dm.reset_state(len(rows))
        with WriteGateRecorder(self.dm, batch.attention_mask) as gates:
            logits = self._call(batch, write=True, keep=batch.keep)
        return _Forward(logits, batch.labels, gates, len(rows))

    def loss(self, groups: list[Group]) -> LossParts:
        return self.offline_loss(groups) if self.config.variant == "offline" else self.online_loss(groups)

    def _sharded_loss(self, groups: list[Group]) -> tuple[Tensor, LossParts]:
        """Data parallel: this rank's share of the micro-batch ``groups``. Returns a surrogate whose gradient,
        summed over ranks, is the gradient of the loss of the whole micro-batch, and the global loss parts.

        The CE is a mean over the global answer tokens (each rank divides its sum by the global count); the
        regulariser ``w·(mean_ℓ S_ℓ/C_ℓ − target)²`` has per-layer sums ``S_ℓ`` over ranks, so its gradient on a
        rank is ``2w(β̄ − target)/(L·C_ℓ)`` times the rank's own ``∂S_ℓ``."""
        c, d = self.config, self.dist
        fw = self._offline_forward(groups) if c.variant == "offline" else self._online_forward(groups)
        ce_sum, n = answer_cross_entropy_sum(fw.logits, fw.labels)
        sums, counts = fw.gates.sums, fw.gates.counts
        L = len(sums)
        total = d.sum([ce_sum, float(n), float(fw.questions), *sums, *counts])
        n_all = float(total[1])
        ce = total[0] / max(n_all, 1.0)
        beta_layers = total[3 : 3 + L] / total[3 + L :].clamp_min(1.0)
        beta = beta_layers.mean()
        coef = (2 * c.beta_reg_weight * (beta - c.beta_target) / (L * total[3 + L :].clamp_min(1.0))).float()
        surrogate = ce_sum / max(n_all, 1.0) + (torch.stack(sums) * coef.to(sums[0].device)).sum()
        reg = c.beta_reg_weight * (beta - c.beta_target) ** 2
        parts = LossParts(ce + reg, float(ce), float(reg), float(beta), int(n_all), int(total[2]))
        return surrogate, parts

    # -- the loop ---------------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches of ``batch_size`` contexts."""
        c = self.config
        self.optimizer.zero_grad(set_to_none=True)
        parts: list[LossParts] = []
        for m in range(c.grad_accum):
            start = (self.step * c.grad_accum + m) * c.batch_size
            groups = self.stream.contexts(start, c.batch_size)
            if self.dist is None:
                lp = self.loss(groups)
                (lp.loss / c.grad_accum).backward()
            else:
                surrogate, lp = self._sharded_loss(self.dist.shard(groups))
                (surrogate / c.grad_accum).backward()
            parts.append(lp)
        self.dm.reset_state(1)  # drop the graph held by the live state
        if self.dist is not None:
            self.dist.sum_gradients(self.params)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.contexts_seen += c.contexts_per_step
        self.questions_seen += sum(p.questions for p in parts)
        k = len(parts)
        return {
            "step": self.step, "loss": sum(float(p.loss.detach()) for p in parts) / k, "ce": sum(p.ce for p in parts) / k,
            "beta_reg": sum(p.reg for p in parts) / k, "mean_beta": sum(p.mean_beta for p in parts) / k,
            "lr": lr, "grad_norm": grad_norm, "contexts_seen": self.contexts_seen,
            "questions_seen": self.questions_seen,
        }

    @property
    def is_main(self) -> bool:
        """Whether this process writes files (always, unless it is a data-parallel rank other than 0)."""
        return self.dist is None or self.dist.is_main

    def train(self, resume: str | Path | None = None, on_checkpoint: Callable[[Path], None] | None = None) -> Path:
        """Run to ``config.steps`` (continuing from ``resume``), checkpointing; returns the final adapter dir.

        Data parallel: every rank runs this; rank 0 writes the config, the log, checkpoints (``on_checkpoint`` is
        called there) and the final adapter, every rank reads ``resume``."""
        c = self.config
        if c.num_threads:
            torch.set_num_threads(c.num_threads)
        main = self.is_main
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "train_config.json").write_text(c.to_json())
        if resume is not None:
            self.load_checkpoint(resume)
        else:
            torch.manual_seed(c.seed)
            random.seed(c.seed)
        log_path = self.out_dir / LOG_NAME
        bar = _progress(range(self.step, c.steps), enabled=self.progress and main, initial=self.step, total=c.steps)
        with log_path.open("a") if main else contextlib.nullcontext() as log:
            for _ in bar:
                t0 = time.perf_counter()
                rec = self.train_step()
                self.elapsed += time.perf_counter() - t0
                rec["elapsed_s"] = round(self.elapsed, 2)
                rec["questions_per_s"] = round(self.questions_seen / max(self.elapsed, 1e-9), 3)
                if main and (self.step % c.log_every == 0 or self.step == c.steps):
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", beta=f"{rec['mean_beta']:.3f}")
                out_of_time = c.time_budget_s is not None and self.elapsed >= c.time_budget_s
                if self.dist is not None and c.time_budget_s is not None:
                    out_of_time = self.dist.any(out_of_time)  # every rank stops at the same step
                if self.step % c.save_every == 0 or self.step == c.steps or out_of_time:
                    ckpt = self.save_checkpoint()
                    if on_checkpoint is not None and main:
                        on_checkpoint(ckpt)
                if out_of_time:
                    break
        final = self.out_dir / "adapter"
        if main:
            save_adapter(self.dm, final, training=self.training_metadata())
            plot_loss(log_path, self.out_dir / "loss_curve.png")
        if self.dist is not None:
            self.dist.barrier()
        return final

    def training_metadata(self) -> dict[str, Any]:
        return {"recipe": self.config.recipe, "config": self.config.to_dict(), "step": self.step,
                "contexts_seen": self.contexts_seen, "questions_seen": self.questions_seen,
                "train_seconds": round(self.elapsed, 1)}

    # -- checkpoints ------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_NNNNNN/`` as a whole, atomically, and return it. Data parallel: rank 0 writes,
        every rank returns once it is written.

        The directory is built under a temporary name and renamed into place, so a run killed while saving
        leaves no half checkpoint for ``latest_checkpoint`` (and a resume) to pick up.
        """
        d = self.out_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{self.step:06d}"
        if self.is_main:
            self._write_checkpoint(d)
        if self.dist is not None:
            self.dist.barrier()
        return d

    def _write_checkpoint(self, d: Path) -> None:
        opt = self.optimizer.state_dict()
        tensors: dict[str, Tensor] = {"rng.torch": torch.get_rng_state()}
        scalars: dict[str, dict[str, Any]] = {}
        for idx, st in opt["state"].items():
            for name, val in st.items():
                if isinstance(val, Tensor):
                    tensors[f"state.{idx}.{name}"] = val.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(idx), {})[name] = val
        state = {
            "step": self.step, "contexts_seen": self.contexts_seen, "questions_seen": self.questions_seen,
            "elapsed": self.elapsed, "param_groups": opt["param_groups"], "optimizer_scalars": scalars,
            "scheduler": {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"},
            "python_rng": _jsonable_rng(random.getstate()),
        }

        def build(tmp: Path) -> None:
            save_adapter(self.dm, tmp, training=self.training_metadata())
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))

        atomic_directory(d, build)

    def load_checkpoint(self, directory: str | Path) -> None:
        """Restore adapter, optimizer, scheduler, RNG and counters from a checkpoint (or a run dir: its latest)."""
        d = latest_checkpoint(directory) or Path(directory)
        self.dm.load_adapter_state_dict(load_file(str(d / WEIGHTS_NAME)))
        state = json.loads((d / "trainer_state.json").read_text())
        tensors = load_file(str(d / "optimizer.safetensors"))
        opt_state: dict[int, dict[str, Any]] = {}
        for key, val in tensors.items():
            if key.startswith("state."):
                _, idx, name = key.split(".", 2)
                opt_state.setdefault(int(idx), {})[name] = val
        for idx, extra in state["optimizer_scalars"].items():
            opt_state.setdefault(int(idx), {}).update(extra)
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
        sched = self.scheduler.state_dict()
        sched.update(state["scheduler"])
        self.scheduler.load_state_dict(sched)
        torch.set_rng_state(tensors["rng.torch"])
        random.setstate(_rng_from_json(state["python_rng"]))
        self.step = state["step"]
        self.contexts_seen = state["contexts_seen"]
        self.questions_seen = state["questions_seen"]
        self.elapsed = state["elapsed"]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The highest-step checkpoint under ``run_dir/checkpoints`` (or ``run_dir`` itself if it is one)."""
    run_dir = Path(run_dir)
    if (run_dir / "trainer_state.json").is_file():
        return run_dir
    found = sorted((run_dir / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*")) if run_dir.is_dir() else []
    found = [p for p in found if (p / "trainer_state.json").is_file()]
    return found[-1] if found else None


def train(config: TrainConfig, out_dir: str | Path, resume: str | Path | None = None, progress: bool = True,
          distributed: DistributedContext | None = None) -> Path:
    """Build the model of ``config``, train it, and return the final adapter directory. With ``distributed``
    (:func:`.distributed.from_environment` under torchrun) this process is one data-parallel rank, its model on the
    rank's device."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = distributed.device if distributed is not None and distributed.device.type == "cuda" else None
    dm, tokenizer = build_model(config, device=device)
    return Trainer(config, dm, tokenizer, out_dir, progress=progress, distributed=distributed).train(resume=resume)


def plot_loss(log_path: Path, png_path: Path) -> None:
    """Loss (and mean β) against questions seen, from the JSONL log."""
    plt = pyplot("train", "the training loss plot")

    recs = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if not recs:
        return
    x = [r["questions_seen"] for r in recs]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, [r["ce"] for r in recs], lw=0.8, label="answer cross-entropy")
    ax.set_xlabel("training questions seen")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax2 = ax.twinx()
    ax2.plot(x, [r["mean_beta"] for r in recs], color="tab:orange", lw=0.8, label="mean β (write pass)")
    ax2.set_ylabel("mean β")
    fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def _progress(it, enabled: bool, **kw) -> Iterator:
    if not enabled:
        return iter(it)
    from tqdm.auto import tqdm

    return tqdm(it, **kw)


def _jsonable_rng(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(data: list) -> tuple:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None
