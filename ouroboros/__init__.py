"""Ouroboros: lossless phrase-level speculative decoding for Hugging Face Llama models."""

__version__ = "0.1.0"

from ouroboros.models import (  # noqa: E402, F401  (public API)
    load_demo_pair,
    load_draft,
    load_model,
    load_pretrained,
    load_target,
    load_tokenizer,
)
