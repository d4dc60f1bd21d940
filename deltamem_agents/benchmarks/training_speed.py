"""Training throughput: the last shipped-candidate recipe (``smollm2-tsw``) against the ladder trainer, in one run.

Both trainers train the same base model on synthetic dialogues in the same process; rounds alternate (one timed
block of steps of each per round) so that drift in machine load hits both alike, and the medians of the rounds are
reported. The figure that matters is the ratio of **training questions per second** (each question is one
supervised read pass; the recipe reads 4 questions per written context, the ladder one or more):

* ``recipe``: :class:`~deltamem_agents.training.trainer.Trainer` with ``smollm2-tsw`` (reads on in the write
  pass, autograd through the base for the whole write pass, all 30 layers);
* both on level-3 dialogues from the first step (the recipe's curriculum is switched off here; the ladder reads
  one question per dialogue, the recipe four);
* ``ladder``: :class:`~deltamem_agents.training.ladder.LadderRun` at rung L2 (the same level-3 dialogues) with
  ``steer_writes=False`` (no-grad write pass) and the adapter on the last quarter of the layers.

Run: ``python -m deltamem_agents.benchmarks.training_speed [--rounds 3] [--steps 2] [--threads 1] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "main",
    "run",
]


def run(rounds: int = 3, steps: int = 2, threads: int | None = 1, ladder_adapter: dict | None = None,
        contexts_per_step: int = 16) -> dict[str, Any]:
    """Median training questions/s of both trainers (see the module docstring); ``contexts_per_step`` is the
    ladder's batch (the recipe keeps its own 4 contexts × 4 questions)."""
    from ..adapter import attach
    from ..models import load_base_model
    from ..training.ladder import LadderConfig, LadderRun
    from ..training.recipes import get_recipe
    from ..training.trainer import Trainer

    if threads:
        torch.set_num_threads(threads)
    model, tok = load_base_model()
    recipe = get_recipe("smollm2-tsw", steps=1000, curriculum=())  # level 3 from step 0, like the ladder's L2
    lcfg = LadderConfig(rung="L2", steps=1000, contexts_per_step=contexts_per_step,
                        adapter=ladder_adapter or {"update_rule": "delta", "target_layers": "last_quarter",
                                                   "rank": 16, "alpha": 32})
    tmp = Path(tempfile.mkdtemp(prefix="deltamem-train-speed-"))
    times: dict[str, list[float]] = {"recipe": [], "ladder": []}
    for _ in range(rounds):
        for arm in ("recipe", "ladder"):
            if arm == "recipe":
                dm = attach(model, recipe.adapter_config())
                trainer = Trainer(recipe, dm, tok, tmp / "recipe", progress=False)
                step = trainer.train_step
            else:
                dm = attach(model, lcfg.adapter_config())
                runner = LadderRun(lcfg, dm, tok, tmp / "ladder")
                step = runner.train_step
            step()  # warm-up (allocations, first-call compilation), not timed
            q0 = trainer.questions_seen if arm == "recipe" else runner.questions_seen
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            dt = time.perf_counter() - t0
            q = (trainer.questions_seen if arm == "recipe" else runner.questions_seen) - q0
            times[arm].append(q / dt)
            dm.detach_adapter()
    med = {arm: statistics.median(v) for arm, v in times.items()}
    return {"rounds": rounds, "steps_per_round": steps, "threads": threads,
            "questions_per_s": med, "per_round": times, "ratio_ladder_over_recipe": med["ladder"] / med["recipe"],
            "recipe": "smollm2-tsw", "ladder": {"rung": "L2", "adapter": lcfg.adapter,
                                                 "contexts_per_step": lcfg.contexts_per_step}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deltamem_agents.benchmarks.training_speed")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    res = run(a.rounds, a.steps, a.threads)
    q = res["questions_per_s"]
    print(f"training questions/s (median of {a.rounds} rounds, {a.threads} thread(s)): "
          f"recipe smollm2-tsw {q['recipe']:.3f}, ladder {q['ladder']:.3f}; "
          f"ladder ÷ recipe = {res['ratio_ladder_over_recipe']:.2f}×")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
