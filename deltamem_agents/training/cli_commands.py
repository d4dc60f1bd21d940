"""``deltamem train``: registered into the ``deltamem`` command by :mod:`deltamem_agents.cli`."""

from __future__ import annotations

import argparse
import json

__all__ = ["register"]


def _cmd_train(args: argparse.Namespace) -> int:
    from .recipes import get_recipe, list_recipes
    from .trainer import latest_checkpoint, train

    if args.list:
        for name in list_recipes():
            print(name)
        return 0
    overrides: dict = {"data_path": args.data, "seed": args.seed, "num_threads": args.threads, "lr": args.lr,
                       "model": args.model, "save_every": args.save_every,
                       "time_budget_s": None if args.time_budget is None else 60.0 * args.time_budget}
    if args.task:
        overrides["task"] = args.task
    config = get_recipe(args.recipe, **overrides)
    if args.steps is None and args.examples is not None:
        # --examples counts written contexts (each with up to questions_per_context questions).
        overrides["steps"] = max(1, -(-args.examples // config.contexts_per_step))
    elif args.steps is not None:
        overrides["steps"] = args.steps
    config = get_recipe(args.recipe, **overrides)
    out = args.out or f"runs/{config.recipe}"
    resume = args.resume
    if resume is not None and latest_checkpoint(resume) is None:
        print(f"no checkpoint under {resume}")
        return 2
    print(json.dumps({"recipe": config.recipe, "steps": config.steps, "out": out}, ensure_ascii=False))
    final = train(config, out, resume=resume, progress=not args.quiet)
    print(f"adapter: {final}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` to the ``deltamem`` command."""
    p = subparsers.add_parser("train", help="train a δ-mem adapter (backbone frozen)")
    p.add_argument("--recipe", default="smollm2-tsw", help="named recipe (see --list)")
    p.add_argument("--list", action="store_true", help="list the recipes and exit")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides the recipe)")
    p.add_argument("--examples", type=int, default=None,
                   help="written contexts to train on (sets --steps from the recipe's batch size)")
    p.add_argument("--out", default=None, help="run directory (default runs/<recipe>)")
    p.add_argument("--resume", default=None, help="a run directory or checkpoint to continue from")
    p.add_argument("--data", default=None, help="data file or benchmarks folder for file tasks")
    p.add_argument("--task", default=None, help="training task (synthetic, babi1..3, banking77)")
    p.add_argument("--model", default=None, help="base model: HF dir, GGUF file or hub id (default: recipe's)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--time-budget", type=float, default=None,
                   help="minutes of training after which to checkpoint and stop (the schedule keeps --steps)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)
