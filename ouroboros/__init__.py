"""Ouroboros: lossless phrase-level speculative decoding for Hugging Face Llama models."""

__version__ = "0.1.0"
