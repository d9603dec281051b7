"""The draft being trained (`DraftStudent`, shape `DraftConfig`) and its export to the
file format ``ouroboros.models.load_draft`` reads (``DRAFT_FORMAT``)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ouroboros.models import DRAFT_FORMAT

__all__ = ["DraftConfig", "DraftStudent", "export_draft", "pca_basis"]


@dataclass
class DraftConfig:
    """Shape of the distilled draft (defaults: the shipped SmolLM2 draft)."""

    hidden_size: int = 384
    num_layers: int = 3
    num_heads: int = 6
    num_kv_heads: int = 2
    intermediate_size: int = 896
    embed_rank: int = 112
    output_vocab: int = 8192


class DraftStudent(nn.Module):
    """Training form of the draft: factorised input embedding, a Llama trunk
    (``LlamaModel``), and an output layer over a vocabulary subset.

    forward(input_ids: int64 [B, T]) -> logits over the subset, float32 [B, T, S]; column
    j scores token ``output_token_ids[j]``.
    """

    def __init__(self, config: DraftConfig, teacher_config, output_token_ids: torch.Tensor,
                 embed_basis: torch.Tensor | None = None):
        super().__init__()
        from transformers import LlamaConfig, LlamaModel

        self.config = config
        self.vocab_size = teacher_config.vocab_size
        self.trunk_config = LlamaConfig(
            vocab_size=1, hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
            head_dim=config.hidden_size // config.num_heads, pad_token_id=None,
            bos_token_id=None, eos_token_id=None,
            max_position_embeddings=teacher_config.max_position_embeddings,
            rms_norm_eps=teacher_config.rms_norm_eps,
            rope_parameters=dict(getattr(teacher_config, "rope_parameters", None)
                                 or {"rope_type": "default", "rope_theta": 10000.0}),
            tie_word_embeddings=False, attn_implementation="sdpa",
        )
        self.trunk = LlamaModel(self.trunk_config)
        rank, d = config.embed_rank, config.hidden_size
        if embed_basis is None:
            embed_basis = torch.randn(self.vocab_size, rank) / math.sqrt(rank)
        if tuple(embed_basis.shape) != (self.vocab_size, rank):
            raise ValueError(f"embed_basis must be [{self.vocab_size}, {rank}], "
                             f"got {tuple(embed_basis.shape)}")
        self.embed_basis = nn.Parameter(embed_basis.clone().float())
        self.embed_in = nn.Parameter(torch.randn(rank, d) / math.sqrt(rank))
        self.embed_out = nn.Parameter(torch.randn(rank, d) / math.sqrt(rank))
        self.register_buffer("output_token_ids", output_token_ids.to(torch.int64).clone())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        inputs = F.embedding(input_ids, self.embed_basis) @ self.embed_in
        hidden = self.trunk(inputs_embeds=inputs, use_cache=False).last_hidden_state
        head = self.embed_basis[self.output_token_ids] @ self.embed_out
        return hidden @ head.T

    def llama_config(self, teacher_config):
        """The ``LlamaConfig`` of the exported ``LlamaForCausalLM`` (teacher's vocabulary
        and special tokens)."""
        from transformers import LlamaConfig

        c = self.trunk_config
        return LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
            head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings,
            rms_norm_eps=c.rms_norm_eps, rope_parameters=dict(c.rope_parameters),
            bos_token_id=teacher_config.bos_token_id, eos_token_id=teacher_config.eos_token_id,
            pad_token_id=getattr(teacher_config, "pad_token_id", None),
            tie_word_embeddings=False, hidden_act=c.hidden_act,
        )

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors of the shipped file: trunk weights under ``model.*`` (Llama names),
        the embedding factors and the output subset under ``ouroboros.*``."""
        tensors = {f"model.{k}": v.detach().clone() for k, v in self.trunk.state_dict().items()
                   if not k.startswith("embed_tokens.")}
        tensors["ouroboros.embed_basis"] = self.embed_basis.detach().clone()
        tensors["ouroboros.embed_in"] = self.embed_in.detach().clone()
        tensors["ouroboros.embed_out"] = self.embed_out.detach().clone()
        tensors["ouroboros.output_token_ids"] = self.output_token_ids.to(torch.int32).clone()
        return tensors


def pca_basis(embedding: torch.Tensor, rank: int) -> torch.Tensor:
    """Project rows of ``embedding: [V, D]`` onto their top-``rank`` principal directions:
    [V, rank] float32, scaled to unit average row norm."""
    centred = embedding.float() - embedding.float().mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    basis = centred @ v[:rank].T
    return basis / basis.norm(dim=1).mean().clamp(min=1e-6)


def export_draft(student: DraftStudent, teacher_config, out: str | os.PathLike,
                 info: dict | None = None, dtype: torch.dtype = torch.float16) -> Path:
    """Write ``student`` as a loadable draft: ``config.json`` (the ``LlamaConfig`` of the
    loaded model), ``model.safetensors`` (floating tensors in ``dtype``) and
    ``draft_info.json`` (format tag + ``info``). Load it with
    ``ouroboros.models.load_draft(path=out)``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
               for k, v in student.export_tensors().items()}
    student.llama_config(teacher_config).save_pretrained(out)
    save_file(tensors, str(out / "model.safetensors"),
              metadata={"format": "pt", "ouroboros": DRAFT_FORMAT})
    stored = sum(v.numel() for k, v in tensors.items() if k != "ouroboros.output_token_ids")
    info = {"format": DRAFT_FORMAT, "stored_parameters": stored,
            "file_dtype": str(dtype).removeprefix("torch."), **(info or {})}
    (out / "draft_info.json").write_text(json.dumps(info, indent=1))
    return out

