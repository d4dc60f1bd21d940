"""Quieting transformers' own progress bars for loads that take about a second."""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator

__all__ = ["transformers_progress"]


@contextlib.contextmanager
def transformers_progress(enabled: bool) -> Iterator[None]:
    """Silence transformers' own progress bars for the block when *enabled* is False."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # The GGUF dequantizer uses tqdm.auto directly, outside transformers' switch.
    gguf_utils = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if gguf_utils is None:
        with contextlib.suppress(ImportError):
            import transformers.modeling_gguf_pytorch_utils as gguf_utils
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()
