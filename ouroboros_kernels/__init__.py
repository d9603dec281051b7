"""Ouroboros kernels: the candidate pool ops and Triton tree-attention kernels."""

__version__ = "0.1.0"

# Tree kernels (issue 3): each dispatches to Triton on CUDA / under TRITON_INTERPRET=1,
# otherwise to its plain PyTorch reference.
# Candidate pool (issue 2): compiled ops in ouroboros_kernels._C, loaded on first use.
from ._ext import extension_info  # noqa: E402, F401
from .acceptance import accept_greedy, accept_sampled  # noqa: E402, F401
from .compact_kv import compact_kv, compact_kv_reference  # noqa: E402, F401
from .pool import CandidatePool, PoolFileError, PoolLookup, cuda_insert_cached  # noqa: E402, F401
from .tree import build_tree, pack_tree_mask, unpack_tree_mask  # noqa: E402, F401
from .tree_attention import tree_attention, tree_attention_reference  # noqa: E402, F401
