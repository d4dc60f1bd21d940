"""Every Python snippet of the README runs as written and shows what it says (on the embedded model).

Each snippet runs in its own interpreter, in a temporary working directory, with a temporary deltamem cache dir
(so ``MemoryEngine()``'s default SQLite store is not the user's) and the already-converted embedded model.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = pytest.mark.embedded


def _snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    from deltamem_agents.models import embedded_model_dir

    env = dict(os.environ, DELTAMEM_CACHE_DIR=str(tmp_path / "cache"),
               DELTAMEM_EMBEDDED_MODEL_DIR=str(embedded_model_dir()), DELTAMEM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_readme_has_the_snippets_this_file_checks():
    snippets = _snippets()
    assert len(snippets) == 2
    assert "attach(" in snippets[0] and "MemoryEngine()" in snippets[1]


def test_adapter_snippet_runs_and_saves_an_adapter(embedded, tmp_path):
    out = _run(_snippets()[0], tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "my-adapter" / "adapter_config.json").is_file()


def test_sessions_snippet_resends_the_real_reply_and_reuses_the_cache(embedded, tmp_path):
    out = _run(_snippets()[1], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False hot True"  # what the snippet's comment says
    assert (tmp_path / "cache" / "sessions.db").is_file()
