"""Optional dependencies: the core install works without the extras, and a feature that needs one says which."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deltamem_agents.errors import DeltaMemError
from deltamem_agents.extras import EXTRAS, MissingDependencyError, require

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = sorted({m for extra in ("postgres", "eval", "train", "server", "cuda") for m in EXTRAS[extra]})


def _hide(monkeypatch, *modules: str) -> None:
    """Make ``import <module>`` fail as it does when the package is not installed."""
    for name in modules:
        for loaded in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
            monkeypatch.delitem(sys.modules, loaded)
        monkeypatch.setitem(sys.modules, name, None)


def test_require_names_the_extra(monkeypatch):
    _hide(monkeypatch, "bm25s")
    with pytest.raises(MissingDependencyError, match=r"pip install 'deltamem-agents\[eval\]'") as info:
        require("bm25s", "eval", "the BM25 RAG baseline")
    assert isinstance(info.value, DeltaMemError) and isinstance(info.value, ImportError)
    assert info.value.extra == "eval" and info.value.name == "bm25s"
    with pytest.raises(ValueError, match="unknown extra"):
        require("json", "nonsense", "x")


def test_a_broken_installed_package_is_not_reported_as_missing(monkeypatch, tmp_path):
    """An ImportError raised inside an installed package (a missing dependency of *its* own) propagates as is."""
    (tmp_path / "brokenpkg").mkdir()
    (tmp_path / "brokenpkg" / "__init__.py").write_text("import a_module_nobody_has\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(EXTRAS, "test", ("brokenpkg",))
    with pytest.raises(ModuleNotFoundError, match="a_module_nobody_has") as info:
        require("brokenpkg", "test", "a test")
    assert not isinstance(info.value, MissingDependencyError)


def test_bm25_baseline_without_bm25s(monkeypatch):
    from deltamem_agents.evaluation.retrieval import Bm25Index

    assert Bm25Index(["the cat sat", "a dog ran"]).select("cat", [3, 3], budget=10) == [0]
    _hide(monkeypatch, "bm25s")
    with pytest.raises(MissingDependencyError, match=r"BM25 RAG baseline needs .*\[eval\]"):
        Bm25Index(["the cat sat"])


@pytest.mark.parametrize(("url", "driver"), [("postgresql://u@127.0.0.1:1/db", "psycopg"),
                                            ("postgresql+asyncpg://u@127.0.0.1:1/db", "asyncpg")])
def test_postgres_without_its_driver(monkeypatch, url, driver):
    from deltamem_agents.store.connect import make_async_engine, make_engine

    _hide(monkeypatch, driver)
    make = make_async_engine if "asyncpg" in url else make_engine
    with pytest.raises(MissingDependencyError, match=r"PostgreSQL store needs .*\[postgres\]"):
        make(url)


def test_plots_without_matplotlib(monkeypatch, tmp_path):
    from deltamem_agents.training.trainer import plot_loss

    log = tmp_path / "log.jsonl"
    log.write_text('{"questions_seen": 1, "loss": 1.0}\n')
    _hide(monkeypatch, "matplotlib")
    with pytest.raises(MissingDependencyError, match=r"\[train\]"):
        plot_loss(log, tmp_path / "loss.png")


@pytest.mark.embedded
def test_the_core_install_needs_no_extra(tmp_path):
    """In a process where every optional package is unimportable, the core works end to end: the package and its
    CLI import, an engine on a tiny model chats and persists two turns in a SQLite file, and reloads them."""
    script = f"""
import sys
for name in {OPTIONAL!r}:
    sys.modules[name] = None  # as if not installed
sys.path.insert(0, {str(ROOT / "tests" / "engine")!r})
from engine_helpers import make_tiny_dm
from transformers import AutoTokenizer
import deltamem_agents, deltamem_agents.cli, deltamem_agents.engine, deltamem_agents.store, deltamem_agents.adapter
from deltamem_agents import MemoryEngine
from deltamem_agents.models import embedded_model_dir

tok = AutoTokenizer.from_pretrained(embedded_model_dir())
db = {str(tmp_path / "s.db")!r}
engine = MemoryEngine((make_tiny_dm(), tok), store=f"sqlite:///{{db}}", max_new_tokens=4)
history = [{{"role": "user", "content": "My name is Ada."}}]
reply = engine.chat("ada", history)
history += [{{"role": "assistant", "content": reply.text}}, {{"role": "user", "content": "Who am I?"}}]
engine.chat("ada", history)
engine.close()
info = MemoryEngine((make_tiny_dm(), tok), store=f"sqlite:///{{db}}").get_session("ada")
assert info.turn == 2, info
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {OPTIONAL!r} and sys.modules[m] is not None)
assert not loaded, loaded
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
