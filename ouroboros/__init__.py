"""Ouroboros: lossless phrase-level speculative decoding for Hugging Face Llama models."""

__version__ = "0.1.0"

# Decoding engine (issue 4).
from ouroboros.attention import enable_ouroboros_attention  # noqa: E402, F401
from ouroboros.cache import StaticKVCache  # noqa: E402, F401
from ouroboros.config import OuroborosConfig  # noqa: E402, F401
from ouroboros.decoder import OuroborosDecoder, generate  # noqa: E402, F401
from ouroboros.generate import (  # noqa: E402, F401
    BatchGenerationResult,
    GenerationResult,
    GenerationStats,
)
from ouroboros.models import (  # noqa: E402, F401  (public API)
    load_demo_pair,
    load_draft,
    load_model,
    load_pretrained,
    load_target,
    load_tokenizer,
)
