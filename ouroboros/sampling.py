"""Token choice at every tree node: greedy argmax, or a sample from the processed
distribution (temperature, then top-k, then top-p: the order transformers applies them).

Sampling is lossless in the engine because every node's token is drawn from the target's
own processed distribution in that node's context, and the walk down the tree follows the
child equal to the draw (``ouroboros_kernels.accept_sampled``): each emitted token is a
draw from the target's next-token distribution, whatever the draft proposed.

The draws are made by inverse CDF from position-keyed uniforms: every row that decides the
p-th new token uses the same ``u_p`` (one independent uniform per output position, drawn
from the seeded generator up front). The emitted path visits each position once, so the
output is exactly autoregressive sampling with ``u_1, u_2, ...``; and since no draw depends
on the tree's shape, a seed gives the same text with every method, draft and pool state
(up to float rounding at a CDF boundary).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SamplingParams", "choose_tokens", "process_logits"]


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen from the target's logits.

    Attributes:
        do_sample: sample (True) or take the argmax (False, greedy).
        temperature: > 0; logits are divided by it before top-k / top-p.
        top_k: keep the k highest logits (ties at the k-th value are kept); None/0: all.
        top_p: keep the smallest set of most likely tokens whose probability reaches
            ``top_p`` (at least one); None/1.0: all.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, bool):
            raise TypeError(f"do_sample must be a bool, got {self.do_sample!r}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ValueError(f"temperature must be a number > 0, got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool)
                                       or not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"top_k must be an int >= 0 or None, got {self.top_k!r}")
        if self.top_p is not None and (not isinstance(self.top_p, (int, float))
                                       or not 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be a number in (0, 1] or None, got {self.top_p!r}")

    @classmethod
    def from_arguments(cls, do_sample: bool | None = None, temperature: float | None = None,
                       top_k: int | None = None, top_p: float | None = None) -> SamplingParams:
        """Greedy unless ``do_sample`` is True, or ``do_sample`` is None and a temperature is
        given (``temperature=0`` means greedy)."""
        if temperature is not None and (isinstance(temperature, bool) or
                                        not isinstance(temperature, (int, float)) or
                                        not temperature >= 0):
            raise ValueError(f"temperature must be a number >= 0 (0: greedy), got "
                             f"{temperature!r}")
        if do_sample is None:
            do_sample = temperature is not None and temperature > 0
        if not do_sample:
            return cls(do_sample=False)
        return cls(do_sample=True, temperature=1.0 if temperature is None else temperature,
                   top_k=top_k, top_p=top_p)


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Processed logits: ``logits: [N, V]`` (any float dtype) -> float32 ``[N, V]`` with
    removed tokens at ``-inf`` (temperature, top-k, top-p, in that order)."""
    scores = logits.float() / params.temperature
    vocab = scores.shape[-1]
    if params.top_k and params.top_k < vocab:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        ascending, order = torch.sort(scores, dim=-1)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1.0 - params.top_p
        drop_sorted[..., -1:] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def choose_tokens(logits: torch.Tensor, params: SamplingParams,
                  uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row: ``logits: [N, V]`` -> ``int64[N]``.

    Greedy: the argmax. Sampling: the inverse CDF of the processed distribution (computed in
    float64) at ``uniforms: float64[N]`` in ``[0, 1)``; a token of probability 0 is never
    chosen.
    """
    if not params.do_sample:
        return logits.argmax(dim=-1)
    if uniforms is None or uniforms.shape != logits.shape[:1]:
        raise ValueError(f"sampling needs one uniform per row: uniforms of shape "
                         f"[{logits.shape[0]}], got "
                         f"{None if uniforms is None else tuple(uniforms.shape)}")
    probs = process_logits(logits, params).double().softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    targets = (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, targets, right=True).squeeze(-1).clamp_(
        max=logits.shape[-1] - 1)
