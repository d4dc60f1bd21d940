"""The trainer on a tiny random Llama with a character tokenizer (fast, no downloads)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_model
from training_helpers import CharTokenizer

from deltamem_agents.adapter import attach
from deltamem_agents.training.config import TrainConfig
from deltamem_agents.training.examples import MemoryExample
from deltamem_agents.training.gates import WriteGateRecorder, steering_disabled
from deltamem_agents.training.recipes import get_recipe, list_recipes
from deltamem_agents.training.trainer import ContextStream, Trainer, latest_checkpoint


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and the CI machine is shared): avoid OpenMP spin-waits."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _group(i: int, q: int = 2) -> list[MemoryExample]:
    """A toy memory task: a code word stated in the history, asked about later."""
    word = "abcdefgh"[i % 8] * 3
    history = [{"role": "user", "content": f"code {word}"}, {"role": "assistant", "content": "ok"}]
    return [MemoryExample(id=f"t{i}-{j}", task="toy", history=history, question=f"code{'?' * (j + 1)}",
                          answers=[word], meta={"group": f"t{i}"}) for j in range(q)]


class ToyStream(ContextStream):
    def __init__(self, n_distinct: int = 8) -> None:
        self.n = n_distinct

    def context(self, i: int):
        return _group(i % self.n)


def _trainer(tmp_path, steps=6, write_mode="tsw", variant="offline", reads=True, seed=0, **kw):
    cfg = TrainConfig(adapter={"write_mode": write_mode, "chunk_size": 8}, variant=variant,
                      reads_in_write_pass=reads, steps=steps, batch_size=2, grad_accum=kw.pop("grad_accum", 1),
                      lr=kw.pop("lr", 3e-3), save_every=kw.pop("save_every", 2), seed=seed, system_prompt="s",
                      curriculum=(), **kw)
    torch.manual_seed(seed)
    dm = attach(tiny_model("llama", seed=0, layers=2), cfg.adapter_config())
    return Trainer(cfg, dm, CharTokenizer(), tmp_path, stream=ToyStream(), progress=False)


def _adapter(dm):
    return {k: v.detach().clone() for k, v in dm.adapter_state_dict().items()}


def test_config_validation_and_recipes():
    with pytest.raises(ValueError):
        TrainConfig(variant="nope")
    with pytest.raises(ValueError):
        TrainConfig(steps=0)
    with pytest.raises(ValueError):
        TrainConfig(curriculum=(0.5, 0.4, 1.0))
    with pytest.raises(ValueError):
        TrainConfig(adapter={"write_mode": "xyz"})
    for name in list_recipes():
        assert get_recipe(name).recipe == name
    assert get_recipe("smollm2-tsw", steps=7, adapter={"rank": 4}).adapter["rank"] == 4
    cfg = get_recipe("smollm2-msw")
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize("write_mode,variant,reads", [("tsw", "offline", True), ("tsw", "offline", False),
                                                      ("ssw", "offline", True), ("msw", "online", True)])
def test_loss_decreases_and_only_adapter_changes(tmp_path, write_mode, variant, reads):
    tr = _trainer(tmp_path, steps=12, write_mode=write_mode, variant=variant, reads=reads, lr=3e-2)
    tr.stream.n = 1  # one context, learnable by heart
    base = {k: v.clone() for k, v in tr.dm.base_model.state_dict().items()}
    before = _adapter(tr.dm)
    fixed = tr.stream.contexts(0, 2)
    with torch.no_grad():
        first = tr.loss(fixed).ce
    tr.train()
    with torch.no_grad():
        last = tr.loss(fixed).ce
    assert last < first * 0.85, (first, last)
    after = tr.dm.base_model.state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base)  # backbone bitwise unchanged
    assert any(not torch.equal(before[k], v) for k, v in _adapter(tr.dm).items())
    assert all(not p.requires_grad for p in tr.dm.base_model.parameters())
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "loss_curve.png").is_file()
    log = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["training"]["config"]["variant"] == variant


def test_gradients_reach_memory_projections_through_the_write_pass(tmp_path):
    tr = _trainer(tmp_path)
    groups = tr.stream.contexts(0, 2)
    lp = tr.offline_loss(groups)
    tr.dm.zero_grad()
    lp.loss.backward()
    W = tr.dm.config.state_width
    for layer in tr.dm.delta_layers.values():
        g = layer.in_proj.grad
        # k, v and β rows are used only by writes: a gradient there came from the read pass through the state.
        assert g[W : 2 * W].abs().sum() > 0 and g[2 * W : 3 * W].abs().sum() > 0 and g[3 * W :].abs().sum() > 0
        assert layer.beta_bias.grad.abs().sum() > 0
    # With the state cut off from the graph the read pass alone gives the write projections no gradient.
    tr.dm.zero_grad()
    tr.write_context(groups)
    tr.dm.set_state(tr.dm.get_state([0, 0, 1, 1]))
    from deltamem_agents.training.collate import encode_prompt_answer, pad_read
    from deltamem_agents.training.trainer import answer_cross_entropy

    rows = [encode_prompt_answer(tr.tokenizer, [{"role": "user", "content": e.question}], e.answer)
            for g in groups for e in g]
    b = pad_read(rows, 0)
    with tr.dm.writes_disabled():
        logits = tr.dm(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                       logits_to_keep=b.keep).logits
    answer_cross_entropy(logits, b.labels)[0].backward()
    for layer in tr.dm.delta_layers.values():
        assert layer.in_proj.grad is None or layer.in_proj.grad[W:].abs().sum() == 0


def test_checkpoint_resume_is_exact(tmp_path):
    full = _trainer(tmp_path / "full", steps=6, grad_accum=2, save_every=3)
    full.train()
    part = _trainer(tmp_path / "part", steps=6, grad_accum=2, save_every=3)
    part.config.time_budget_s = 1e-9  # stop after the first step ... then let it run to step 3
    part.config.time_budget_s = None
    part.train_step(), part.train_step(), part.train_step()
    ckpt = part.save_checkpoint()
    resumed = _trainer(tmp_path / "part", steps=6, grad_accum=2, save_every=3, seed=123)  # fresh init, other seed
    resumed.train(resume=tmp_path / "part")
    assert latest_checkpoint(tmp_path / "part").name == "step_000006" and ckpt.name == "step_000003"
    a, b = _adapter(full.dm), _adapter(resumed.dm)
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert full.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()


def test_a_checkpoint_killed_while_saving_leaves_the_previous_one(tmp_path, monkeypatch):
    """A failure between the checkpoint's files (here: writing the optimizer state) leaves no step directory
    behind, so a resume picks the last complete checkpoint rather than a half-written one."""
    import deltamem_agents.training.trainer as trainer_module

    tr = _trainer(tmp_path / "run", steps=6, grad_accum=2, save_every=3)
    tr.train_step()
    first = tr.save_checkpoint()
    tr.train_step()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer_module, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        tr.save_checkpoint()
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == [first.name]  # no step_000002, no temporary left over
    assert latest_checkpoint(tmp_path / "run") == first


def test_beta_regulariser_value(tmp_path):
    tr = _trainer(tmp_path, beta_reg_weight=0.5, beta_target=0.3)
    with torch.no_grad():
        for layer in tr.dm.delta_layers.values():
            W = layer.config.state_width
            layer.in_proj[3 * W :].zero_()
            layer.beta_bias.copy_(torch.linspace(-2.0, 1.0, W))
    expected_beta = torch.sigmoid(torch.linspace(-2.0, 1.0, tr.dm.config.state_width)).mean()
    lp = tr.offline_loss(tr.stream.contexts(0, 2))
    assert lp.mean_beta == pytest.approx(float(expected_beta), rel=1e-6)
    assert lp.reg == pytest.approx(0.5 * (float(expected_beta) - 0.3) ** 2, rel=1e-5)
    # Padding is excluded: a recorder with a mask that hides everything but one token sees that token's gate.
    x = torch.ones(2, 3, dtype=torch.long)
    with WriteGateRecorder(tr.dm, mask=torch.tensor([[1, 0, 0], [0, 0, 0]])) as rec:
        tr.dm.reset_state(2)
        tr.dm(input_ids=x, attention_mask=torch.tensor([[1, 0, 0], [0, 0, 0]]))
    assert float(rec.mean().detach()) == pytest.approx(float(expected_beta), rel=1e-6)


def test_steering_disabled_restores_parameters(tmp_path):
    tr = _trainer(tmp_path)
    names = [n for n, _ in tr.dm.named_parameters()]
    with steering_disabled(tr.dm):
        assert all(layer.delta_q is None for layer in tr.dm.delta_layers.values())
    assert [n for n, _ in tr.dm.named_parameters()] == names


def test_write_pass_padding_is_exact(tmp_path):
    """A context written in a padded batch leaves the same state as written alone."""
    tr = _trainer(tmp_path)
    short, long_ = _group(0), [MemoryExample(id="x", task="toy", history=[
        {"role": "user", "content": "a much longer message " * 3}], question="q", answers=["a"])]
    with torch.no_grad():
        tr.write_context([short, long_])
        both = tr.dm.get_state([0])
        tr.write_context([short])
        alone = tr.dm.get_state([0])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(both.memory, alone.memory, strict=True))
