"""Tokenizer set-up every loaded model gets."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["prepare_tokenizer"]


def prepare_tokenizer(tokenizer: Any, model: Any = None) -> Any:
    """Make a tokenizer ready for batched generation: a pad token (falling back to EOS) and left padding.

    Also gives the model's generation config the pad token id when it has none.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            logger.warning("tokenizer has neither a pad nor an eos token; batched generation will need one")
    tokenizer.padding_side = "left"
    generation_config = getattr(model, "generation_config", None)
    if (
        generation_config is not None
        and generation_config.pad_token_id is None
        and tokenizer.pad_token_id is not None
    ):
        generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer
