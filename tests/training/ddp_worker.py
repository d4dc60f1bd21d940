"""One rank of the data-parallel trainer test, started by ``torchrun`` (``tests/training/test_distributed.py``).

Also the place where the toy run is defined, so the test builds its single-process reference the same way."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: tiny_models
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/training: training_helpers

from tiny_models import tiny_model  # noqa: E402
from training_helpers import CharTokenizer  # noqa: E402

from deltamem_agents.adapter import attach  # noqa: E402
from deltamem_agents.training.config import TrainConfig  # noqa: E402
from deltamem_agents.training.examples import MemoryExample  # noqa: E402
from deltamem_agents.training.ladder import LadderConfig, LadderRun  # noqa: E402
from deltamem_agents.training.trainer import ContextStream, Trainer  # noqa: E402

STEPS = 4
LADDER_STEPS = 3


class ChatCharTokenizer(CharTokenizer):
    """The character tokenizer with a (trivial) chat template, as the ladder's message renderer needs."""

    chat_template = "char-chatml"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False, tools=None):
        return super().apply_chat_template(messages, tokenize, add_generation_prompt)


class DistinctStream(ContextStream):
    """Context ``i``: a code word stated in the history and asked about; lengths differ from context to context,
    so the ranks' shards have different token counts (what the global normalisation is for)."""

    def __init__(self) -> None:
        pass

    def context(self, i: int) -> list[MemoryExample]:
        word = "abcdefgh"[i % 8] * (2 + i % 3)
        history = [{"role": "user", "content": f"code {word}" + " ok" * (i % 4)},
                   {"role": "assistant", "content": "noted"}]
        return [MemoryExample(id=f"c{i}-{j}", task="toy", history=history, question="code" + "?" * (j + 1),
                              answers=[word]) for j in range(1 + i % 2)]


def make_trainer(out_dir, *, write_mode: str = "tsw", variant: str = "offline", seed: int = 0,
                 distributed=None) -> Trainer:
    cfg = TrainConfig(adapter={"write_mode": write_mode, "chunk_size": 8}, variant=variant, steps=STEPS,
                      batch_size=2, grad_accum=2, lr=3e-2, save_every=2, seed=0, system_prompt="s", curriculum=(),
                      beta_reg_weight=0.5, beta_target=0.3)
    torch.manual_seed(seed)  # the adapter's initialisation (rank 0's is broadcast under data parallel)
    dm = attach(tiny_model("llama", seed=0, layers=2), cfg.adapter_config())
    return Trainer(cfg, dm, CharTokenizer(), out_dir, stream=DistinctStream(), progress=False,
                   distributed=distributed)


def make_ladder(out_dir, *, distributed=None) -> LadderRun:
    """A ladder run on the tiny model: 4 contexts per step, half of them asking for the fact back."""
    cfg = LadderConfig(rung="L1", distractors=(1,), steps=LADDER_STEPS, contexts_per_step=4, lr=3e-2,
                       recon_frac=0.5, system_prompt="s")
    torch.manual_seed(0)
    dm = attach(tiny_model("llama", seed=0, layers=2), cfg.adapter_config())
    return LadderRun(cfg, dm, ChatCharTokenizer(), out_dir, distributed=distributed)


def ladder_steps(run: LadderRun) -> list[float]:
    return [run.train_step()["loss"] for _ in range(LADDER_STEPS)]


def main(out: str) -> int:
    from deltamem_agents.training.distributed import from_environment

    torch.set_num_threads(1)
    dist = from_environment()
    assert dist is not None and dist.world_size == 2, "start me with torchrun --nproc-per-node 2"
    root = Path(out)
    for mode, variant in (("tsw", "offline"), ("ssw", "online")):
        run = root / f"{mode}-{variant}"
        make_trainer(run / "full", write_mode=mode, variant=variant, distributed=dist).train()
        # resume the step-2 checkpoint in a trainer initialised differently: it must continue exactly
        resumed = make_trainer(run / "resumed", write_mode=mode, variant=variant, seed=123, distributed=dist)
        resumed.train(resume=run / "full" / "checkpoints" / "step_000002")
    ladder = make_ladder(root / "ladder", distributed=dist)
    losses = ladder_steps(ladder)
    if dist.is_main:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ladder.dm.adapter_state_dict().items()},
                  str(root / "ladder_adapter.safetensors"))
        (root / "ladder_losses.json").write_text(json.dumps(losses))
    (root / f"rank{dist.rank}.done").write_text("ok")
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
