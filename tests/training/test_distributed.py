"""Data-parallel training: two ``gloo`` ranks started by the real ``torchrun`` train the adapter one process trains
on the same global batch, and a run resumed from a data-parallel checkpoint continues exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_worker import STEPS, ladder_steps, make_ladder, make_trainer
from safetensors.torch import load_file

from deltamem_agents.training.distributed import DistributedContext, from_environment, shard_bounds

ROOT = Path(__file__).resolve().parents[2]
# Float rounding differs between the sharded and the whole-batch loss (sums in another order, the regulariser
# through a surrogate); after 4 AdamW steps at lr 3e-2 the parameters have moved by ~0.075 and differ by ~6e-6.
PARAM_TOL = dict(atol=5e-5, rtol=0.0)
RUNS = (("tsw", "offline"), ("ssw", "online"))


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "training" / "ddp_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "rank0.done").is_file() and (out / "rank1.done").is_file()
    return out


@pytest.fixture(scope="module")
def single_process_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for mode, variant in RUNS:
            make_trainer(out / f"{mode}-{variant}", write_mode=mode, variant=variant).train()
    finally:
        torch.set_num_threads(prev)
    return out


@pytest.mark.parametrize("mode,variant", RUNS)
def test_two_ranks_train_the_adapter_of_one_process(two_rank_runs, single_process_runs, mode, variant):
    ref = load_file(str(single_process_runs / f"{mode}-{variant}" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(two_rank_runs / f"{mode}-{variant}" / "full" / "adapter" / "adapter_model.safetensors"))
    init = make_trainer(two_rank_runs / "unused", write_mode=mode, variant=variant).dm.adapter_state_dict()
    assert set(got) == set(ref)
    assert max(float((ref[k] - init[k]).abs().max()) for k in ref) > 1e-2  # training moved the adapter
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], **PARAM_TOL, msg=lambda m, k=k: f"{k}: {m}")
    # the log (rank 0's) shows the global batch: same losses, β and question counts as one process
    logs = [[json.loads(x) for x in (d / f"{mode}-{variant}" / sub / "train_log.jsonl").read_text().splitlines()]
            for d, sub in ((single_process_runs, ""), (two_rank_runs, "full"))]
    assert [r["step"] for r in logs[1]] == list(range(1, STEPS + 1))
    for a, b in zip(*logs, strict=True):
        assert b["questions_seen"] == a["questions_seen"] and b["contexts_seen"] == a["contexts_seen"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["mean_beta"] == pytest.approx(a["mean_beta"], rel=1e-5)


@pytest.mark.parametrize("mode,variant", RUNS)
def test_resume_from_a_data_parallel_checkpoint_is_exact(two_rank_runs, mode, variant):
    run = two_rank_runs / f"{mode}-{variant}"
    assert sorted(p.name for p in (run / "full" / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    full = load_file(str(run / "full" / "adapter" / "adapter_model.safetensors"))
    resumed = load_file(str(run / "resumed" / "adapter" / "adapter_model.safetensors"))
    for k in full:  # the trainer's documented guarantee: a resumed run continues bit for bit
        assert torch.equal(full[k], resumed[k]), k
    log = [json.loads(x) for x in (run / "resumed" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3, 4]


def test_two_ranks_run_the_ladder_step_of_one_process(two_rank_runs, tmp_path):
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = make_ladder(tmp_path)
        losses = ladder_steps(run)
    finally:
        torch.set_num_threads(prev)
    got = load_file(str(two_rank_runs / "ladder_adapter.safetensors"))
    for k, v in run.dm.adapter_state_dict().items():
        torch.testing.assert_close(got[k], v, **PARAM_TOL, msg=lambda m, k=k: f"{k}: {m}")
    assert json.loads((two_rank_runs / "ladder_losses.json").read_text()) == pytest.approx(losses, rel=1e-5)


def test_shards_cover_the_batch_once():
    for n in (2, 3, 7, 16):
        for world in (1, 2, 3):
            if n < world:
                continue
            parts = [shard_bounds(n, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))
            assert all(hi > lo for lo, hi in parts)
    ctx = DistributedContext(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    assert ctx.shard(list("abcde")) == ["c", "d", "e"] and not ctx.is_main
    with pytest.raises(ValueError, match="smaller than the 2 ranks"):
        ctx.check_batch(1)
    with pytest.raises(ValueError, match="outside"):
        DistributedContext(rank=2, world_size=2, local_rank=0, device=torch.device("cpu"))


def test_single_process_environment_is_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert from_environment() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        from_environment()
