"""What every ``deltamem`` subcommand shares: the torch thread count (``--threads``, ``$DELTAMEM_THREADS``) and
the help formatter. The subcommand modules of each subsystem (``engine/cli_commands.py``, ``server/…``,
``evaluation/…``, ``training/…``) import it from here, below them, rather than from ``cli.py`` above them.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

__all__ = ["THREADS_ENV", "HelpFormatter", "add_threads_argument", "apply_threads", "default_threads", "thread_count"]

#: Environment variable overriding the default of every ``--threads``.
THREADS_ENV = "DELTAMEM_THREADS"
_warned_env: set[str] = set()


def default_threads() -> int:
    """The default torch CPU thread count: ``$DELTAMEM_THREADS`` if set (0: torch's own choice), else
    ``max(1, min(4, cpu_count // 2))``.

    Half the cores, at most four: on shared 2-core machines, many threads ran 5–9x slower than one under load.
    """
    env = os.environ.get(THREADS_ENV, "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            value = -1
        if value >= 0:
            return value
        if env not in _warned_env:
            _warned_env.add(env)
            print(f"warning: ignoring ${THREADS_ENV}={env!r} (not a non-negative integer)", file=sys.stderr)
    return max(1, min(4, (os.cpu_count() or 1) // 2))


def thread_count(text: str) -> int:
    """``--threads`` values: a non-negative integer (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N``, the same on every command that runs a model (see :func:`default_threads`)."""
    parser.add_argument(
        "--threads", type=thread_count, default=default_threads(), metavar="N",
        help=f"torch CPU threads, set before the model loads; 0 leaves torch's own choice (default: %(default)s: "
        f"${THREADS_ENV} if set, else max(1, min(4, CPUs // 2)), with {os.cpu_count() or 1} CPUs here)",
    )  # fmt: skip


def apply_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)`` unless ``threads`` is 0 (then torch keeps its own choice)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (unless its help already speaks of its default, or there is none to show),
    keeps the description's and the help texts' line breaks, and wraps each line on its own."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or not action.option_strings or default is None or default is False:
            return text
        return text if default is argparse.SUPPRESS else text + " (default: %(default)s)"

    def _split_lines(self, text: str, width: int) -> list[str]:
        paragraphs = text.splitlines()
        if len(paragraphs) == 1:
            return super()._split_lines(text, width)
        # a multi-line help: its lines stay lines; their continuations are indented
        lines: list[str] = []
        for line in paragraphs:
            lines.extend(textwrap.wrap(line, width, subsequent_indent="  ") or [""])
        return lines
