"""Ouroboros kernels: the candidate pool ops and Triton tree-attention kernels."""

__version__ = "0.1.0"
