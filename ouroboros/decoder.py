"""Public API: `OuroborosDecoder` (keeps the candidate pool warm across calls) and
`generate` (one call, cold pool).

>>> decoder = OuroborosDecoder(target, draft, OuroborosConfig.preset("ouroboros"))
>>> result = decoder.generate(input_ids, max_new_tokens=128)
>>> result.sequences, result.stats.mean_accepted
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence

import torch

from ouroboros import distributed
from ouroboros.adaptive import adaptive_config, planner_for
from ouroboros.attention import (
    check_architecture,
    check_features,
    ouroboros_attention,
    register,
    resolve_backend,
)
from ouroboros.cache import StaticKVCache, cache_kwarg_name
from ouroboros.config import OuroborosConfig
from ouroboros.generate import (
    BatchGenerationResult,
    GenerationResult,
    GenerationStats,
    JacobiWindow,
    LogitRules,
    ModelRunner,
    Row,
    Session,
    StopRules,
    run_generation,
)
from ouroboros.sampling import SamplingParams
from ouroboros.tuning import measure, tuning_enabled

__all__ = ["OuroborosDecoder", "generate"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _parameter(model: torch.nn.Module, name: str) -> torch.Tensor:
    try:
        return next(model.parameters())
    except (StopIteration, AttributeError) as err:
        raise TypeError(f"{name} must be a torch.nn.Module with parameters (a causal LM), "
                        f"got {type(model).__name__}") from err


def _special_ids(model: torch.nn.Module) -> dict[str, object]:
    ids = {}
    for source in (model.config, getattr(model, "generation_config", None)):
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(source, name, None) if source is not None else None
            if value is not None:
                ids[name] = sorted(value) if isinstance(value, (list, tuple)) else [value]
    return ids


def check_models(target: torch.nn.Module, draft: torch.nn.Module | None,
                 config: OuroborosConfig, backend: str) -> None:
    """Clear errors for model pairs the engine cannot run exactly (see `OuroborosDecoder`)."""
    target_parameter = _parameter(target, "target")
    check_architecture(target, "target", config.force_architecture)
    if target_parameter.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"target dtype {target_parameter.dtype} is not supported (float32, "
                        "float16, bfloat16; float64 with the reference backend)")
    if target_parameter.dtype == torch.float64 and backend == "triton":
        raise TypeError("float64 models need attention_backend='reference' (the Triton kernel "
                        "takes fp16, bf16 and fp32)")
    if draft is None:
        if config.use_draft:
            raise ValueError(f"method {config.name!r} needs a draft model (use_draft=True): pass "
                             "draft=..., or use the 'lookahead' or 'greedy' preset")
        return
    draft_parameter = _parameter(draft, "draft")
    check_architecture(draft, "draft", config.force_architecture)
    if draft_parameter.dtype != target_parameter.dtype:
        raise TypeError(f"draft dtype {draft_parameter.dtype} differs from target dtype "
                        f"{target_parameter.dtype}; load both in the same dtype")
    if draft_parameter.device != target_parameter.device and \
            draft_parameter.device.type != "cpu":
        # Another GPU than the target's first one would need device guards around every
        # Triton launch of the draft's steps; a CPU draft runs the PyTorch references.
        raise ValueError(f"draft is on {draft_parameter.device} but target's first layer "
                         f"is on {target_parameter.device}; put the draft on that device "
                         f"or on the CPU")
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft and target must share the tokenizer: vocab sizes differ "
                         f"(draft {draft.config.vocab_size}, target "
                         f"{target.config.vocab_size})")
    target_ids, draft_ids = _special_ids(target), _special_ids(draft)
    for name in sorted(set(target_ids) & set(draft_ids)):
        if target_ids[name] != draft_ids[name]:
            raise ValueError(f"draft and target must share the tokenizer: {name} differs "
                             f"(draft {draft_ids[name]}, target {target_ids[name]})")


def _integer_tensor(name: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {tensor.dtype}")


def _token_list(tokens: object, name: str) -> list[int]:
    if isinstance(tokens, torch.Tensor):
        _integer_tensor(name, tokens)
        if tokens.dim() != 1:
            raise ValueError(f"{name} must be one sequence of token ids, got shape "
                             f"{tuple(tokens.shape)}")
        return tokens.tolist()
    if not isinstance(tokens, Sequence) or isinstance(tokens, (str, bytes)):
        raise TypeError(f"{name} must be a list of ints (token ids), got "
                        f"{type(tokens).__name__}")
    tokens = list(tokens)
    if any(isinstance(t, bool) or not isinstance(t, int) for t in tokens):
        raise TypeError(f"{name} as a sequence must hold ints (token ids)")
    return tokens


def _prompt_tokens(input_ids: object) -> list[int]:
    """The one prompt of a single-sequence call."""
    if isinstance(input_ids, torch.Tensor):
        _integer_tensor("input_ids", input_ids)
        if input_ids.dim() == 2:
            if input_ids.shape[0] != 1:
                raise ValueError(f"input_ids has batch size {input_ids.shape[0]}: pass it "
                                 "with attention_mask= (or as a list of lists) for a batch")
            input_ids = input_ids[0]
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be [1, S] or [S], got shape "
                             f"{tuple(input_ids.shape)}")
        tokens = input_ids.tolist()
    elif isinstance(input_ids, Sequence) and not isinstance(input_ids, (str, bytes)):
        tokens = _token_list(input_ids, "input_ids")
    else:
        raise TypeError(f"input_ids must be a LongTensor [1, S] or a list of ints, got "
                        f"{type(input_ids).__name__}")
    if not tokens:
        raise ValueError("input_ids is empty: the prompt needs at least one token")
    return tokens


def is_batch(input_ids: object, attention_mask: object) -> bool:
    """Whether a call decodes a batch: a list of token lists, a 2-D tensor of more than one
    row, or any 2-D tensor with an ``attention_mask``."""
    if attention_mask is not None:
        return True  # (a mask with one sequence of ids is refused by `batch_prompts`)
    if isinstance(input_ids, torch.Tensor):
        return input_ids.dim() == 2 and input_ids.shape[0] > 1
    return isinstance(input_ids, Sequence) and not isinstance(input_ids, (str, bytes)) and \
        len(input_ids) > 0 and all(isinstance(row, (Sequence, torch.Tensor)) and
                                   not isinstance(row, (str, bytes)) for row in input_ids)


def batch_prompts(input_ids: object, attention_mask: object) -> list[list[int]]:
    """The prompts of a batch, without padding: ``input_ids int64[B, S]`` with
    ``attention_mask [B, S]`` (1 = token, 0 = left padding; None: no padding), or a list
    of B token lists. ValueError naming the argument for a mask of another shape, padding
    that is not on the left, or a row with no tokens."""
    if isinstance(input_ids, torch.Tensor):
        _integer_tensor("input_ids", input_ids)
        if input_ids.dim() != 2 or input_ids.shape[0] == 0:
            raise ValueError(f"input_ids of a batch (with an attention_mask, or B > 1) must "
                             f"be [B, S] with B >= 1, got shape {tuple(input_ids.shape)}")
        rows = input_ids.tolist()
        if attention_mask is None:
            masks = [[1] * len(row) for row in rows]
        else:
            if not isinstance(attention_mask, torch.Tensor):
                attention_mask = torch.as_tensor(attention_mask)
            if tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                                 f"input_ids {tuple(input_ids.shape)}: they must match")
            masks = attention_mask.to(torch.int64).tolist()
        prompts = []
        for b, (row, mask) in enumerate(zip(rows, masks)):
            if any(m not in (0, 1) for m in mask):
                raise ValueError(f"attention_mask must hold 0 and 1, row {b} has "
                                 f"{sorted(set(mask))}")
            first = next((i for i, m in enumerate(mask) if m), None)
            if first is None:
                raise ValueError(f"attention_mask row {b} is all padding: row {b} has no "
                                 f"tokens")
            if not all(mask[first:]):
                raise ValueError(f"attention_mask row {b} has padding after its first token; "
                                 f"ouroboros takes left padding (padding_side='left', as "
                                 f"transformers' generate)")
            prompts.append(row[first:])
        return prompts
    if attention_mask is not None:
        raise ValueError("attention_mask goes with input_ids as a [B, S] tensor; a list of "
                         "token lists needs no mask")
    prompts = [_token_list(row, f"input_ids row {b}") for b, row in enumerate(input_ids)]
    for b, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"input_ids row {b} is empty: row {b} has no tokens (every "
                             f"prompt needs one)")
    return prompts


def _token_id(value: object, name: str) -> int:
    if isinstance(value, torch.Tensor) and value.dim() == 0 and \
            not value.is_floating_point() and value.dtype != torch.bool:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must hold int token ids, got {value!r}")
    return value


def _eos_ids(target: torch.nn.Module, eos_token_id: object) -> frozenset:
    """The EOS set: ``eos_token_id`` (an int, a sequence of ints or an integer tensor) or,
    when None, the target's generation config's (as transformers), else its config's."""
    if eos_token_id is None:
        source = getattr(target, "generation_config", None) or target.config
        eos_token_id = getattr(source, "eos_token_id", None)
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, (str, bytes, float)):
        raise TypeError(f"eos_token_id must be an int, a sequence of ints or None, got "
                        f"{eos_token_id!r}")
    if isinstance(eos_token_id, torch.Tensor):
        if eos_token_id.is_floating_point() or eos_token_id.dtype == torch.bool:
            raise TypeError(f"eos_token_id must hold integer ids, got dtype "
                            f"{eos_token_id.dtype}")
        eos_token_id = eos_token_id.reshape(-1).tolist()
    if not isinstance(eos_token_id, Sequence):
        eos_token_id = [eos_token_id]
    ids = frozenset(_token_id(t, "eos_token_id") for t in eos_token_id)
    vocab = target.config.vocab_size
    if any(not 0 <= t < vocab for t in ids):
        raise ValueError(f"eos_token_id must lie in [0, {vocab}) (the vocabulary), got "
                         f"{sorted(ids)}")
    return ids


# Generation-config settings that change what ``target.generate(do_sample=False)`` chooses
# and that the engine does not apply, with the value that means "off".
_UNSUPPORTED_SETTINGS = {
    "encoder_repetition_penalty": (None, 1.0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "sequence_bias": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "forced_decoder_ids": (None,),
    "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
}


_UNSUPPORTED_SAMPLING = {"min_p": (None, 0.0), "typical_p": (None, 1.0),
                         "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0)}


def _refuse_settings(config: object, table: dict, why: str) -> None:
    """ValueError naming the first setting of ``table`` that ``config`` sets to a value
    other than its "off" values."""
    for name, off in table.items():
        value = getattr(config, name, None)
        if value not in off:
            raise ValueError(
                f"the target's generation_config sets {name}={value!r}, which ouroboros does "
                f"not apply {why}; unset it (target.generation_config.{name} = None) or pass "
                f"ignore_generation_config=True to decode without it")


def sampling_from_generation_config(target: torch.nn.Module, sampling: SamplingParams,
                                    temperature: float | None, top_k: int | None,
                                    top_p: float | None,
                                    ignore_unsupported: bool = False) -> SamplingParams:
    """Sampling as ``target.generate(do_sample=True)`` does it: the arguments not given
    (None) come from the target's generation config (``temperature``, ``top_k``,
    ``top_p``); warpers the engine does not apply (``min_p``, ``typical_p``, ...) raise a
    ValueError naming them unless ``ignore_unsupported``."""
    config = getattr(target, "generation_config", None)
    if config is None:
        return sampling
    if not ignore_unsupported:
        _refuse_settings(config, _UNSUPPORTED_SAMPLING, "when sampling")
    fields = {"temperature": sampling.temperature, "top_k": sampling.top_k,
              "top_p": sampling.top_p}
    for name, given in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
        value = getattr(config, name, None)
        if given is None and value is not None:
            fields[name] = value
    return SamplingParams(True, **fields)


def generation_rules(target: torch.nn.Module, prompt_length: int, eos: frozenset,
                     ignore_unsupported: bool = False) -> LogitRules | None:
    """The target's generation-config processors as `LogitRules` (None when there are
    none): ``repetition_penalty``, ``no_repeat_ngram_size``, ``bad_words_ids``,
    ``suppress_tokens``, ``begin_suppress_tokens``, ``min_new_tokens`` and ``min_length``
    are applied per tree node from that node's own context; any other setting that would
    change greedy decoding (``sequence_bias``, forced tokens, ...) raises a ValueError
    naming it, unless ``ignore_unsupported`` (then it is ignored, and the output equals
    ``target.generate`` run without it)."""
    config = getattr(target, "generation_config", None)
    if config is None:
        return None
    if not ignore_unsupported:
        _refuse_settings(config, _UNSUPPORTED_SETTINGS, "(its output would differ from "
                         "target.generate)")
    suppress = sorted(set(getattr(config, "suppress_tokens", None) or []))
    begin = sorted(set(getattr(config, "begin_suppress_tokens", None) or []))
    min_new = max(getattr(config, "min_new_tokens", None) or 0,
                  (getattr(config, "min_length", None) or 0) - prompt_length)
    penalty = getattr(config, "repetition_penalty", None)
    penalty = None if penalty in (None, 1.0) else float(penalty)
    no_repeat = int(getattr(config, "no_repeat_ngram_size", None) or 0)
    bad_words = [list(map(int, word)) for word in getattr(config, "bad_words_ids", None) or []]
    if any(not word for word in bad_words):
        raise ValueError("the target's generation_config.bad_words_ids holds an empty word")
    if not suppress and not begin and (min_new <= 0 or not eos) and penalty is None and \
            not no_repeat and not bad_words:
        return None
    return LogitRules(suppress=[int(t) for t in suppress], begin_suppress=[int(t) for t in begin],
                      min_new_tokens=max(min_new, 0), eos=sorted(eos),
                      repetition_penalty=penalty, no_repeat_ngram_size=no_repeat,
                      bad_words=bad_words)


def default_config(target: torch.nn.Module, draft: torch.nn.Module | None, tokenizer=None):
    """``(config, measurements)`` of ``config=None``: the tuned configuration of this device
    and model pair as the envelope of adaptive trees (`ouroboros.adaptive.adaptive_config`),
    with the measurements the planner needs. Measured once per device and pair (a line on
    stderr says what), then read from the cache of `ouroboros.tuning.measure`; the draft's
    agreement is measured on the built-in calibration prompts when a ``tokenizer`` is given.
    Without one the agreement prior is what was measured for the pair before, else the
    cost model's prior (0.7): it only seeds the first steps, the planner follows what the
    sequence shows (a pessimistic prior would keep it from trying the draft; measured on
    text from the BOS token alone the agreement came out at 0.21 for the demo pair, against
    0.5-0.6 on real prompts). With ``OUROBOROS_TUNING=off``: the ``ouroboros`` preset
    (``lookahead`` without a draft) and no measurements."""
    method = "ouroboros" if draft is not None else "lookahead"
    if not tuning_enabled():
        return OuroborosConfig.preset(method), None
    from ouroboros.tuning import choose_from

    measurements = measure(target, draft, tokenizer, progress=True)
    base = choose_from(measurements, method)
    return adaptive_config(measurements, base), measurements


class OuroborosDecoder:
    """Lossless speculative decoding of ``target`` with ``draft`` under one configuration.

    Args:
        target: a ``LlamaForCausalLM`` (other architectures need
            ``config.force_architecture``); switched to the ``"ouroboros"`` attention only
            while `generate` runs, then back to its own implementation.
        draft: a smaller causal LM with the same tokenizer, or None for the presets without a
            draft (``greedy``, ``lookahead``). May be the target itself.
        config: an `OuroborosConfig`, a preset name, or None: the configuration tuned for
            this device and model pair with adaptive trees (`default_config`: the pass
            costs are measured once, a few seconds on a CPU, and cached; the ``ouroboros``
            preset, or ``lookahead`` without a draft, when ``OUROBOROS_TUNING=off``). A
            configuration with ``adaptive=True`` reads the measured costs from the same
            cache (and stays a fixed tree when tuning is off).
        tokenizer: optional; with ``config=None`` the draft's agreement is measured on the
            built-in calibration prompts encoded with it.

    The candidate pool lives in the decoder: with ``config.warm_start`` every call starts
    from what earlier calls learned (`save_pool` / `load_pool` carry it across processes).

    Raises:
        ValueError / TypeError: unverified architecture, missing draft, vocabulary or special
            token mismatch, dtype or device mismatch, unsupported dtype.
    """

    def __init__(self, target: torch.nn.Module, draft: torch.nn.Module | None = None,
                 config: OuroborosConfig | str | None = None, *, tokenizer=None) -> None:
        self.measurements = None  # ouroboros.tuning.Measurements, for adaptive trees
        if config is None:
            config, self.measurements = default_config(target, draft, tokenizer)
        elif isinstance(config, str):
            config = OuroborosConfig.preset(config)
        elif not isinstance(config, OuroborosConfig):
            raise TypeError(f"config must be an OuroborosConfig, a preset name or None, got "
                            f"{type(config).__name__}")
        device = _parameter(target, "target").device
        self.backend = resolve_backend(config.attention_backend, device)
        check_models(target, draft, config, self.backend)
        if config.adaptive and self.measurements is None and tuning_enabled():
            # The cost curves (cached by tuned_config or measured now); the agreement prior
            # is whatever was measured for the pair.
            self.measurements = measure(target, draft if config.use_draft else None,
                                        progress=True)
        self.config = config
        self.target = target
        self.draft = draft if config.use_draft else None
        register()  # the attention is switched only while generate runs
        self.device = device
        self.pool = None
        if config.uses_pool:
            from ouroboros_kernels import CandidatePool

            self.pool = CandidatePool(target.config.vocab_size, config.pool_capacity,
                                      config.phrase_len, device=device)
        self._caches: dict[str, StaticKVCache] = {}
        self._lock = threading.Lock()
        self._owner: int | None = None

    def _check_memory(self, rows: dict[str, int], batch_size: int = 1) -> None:
        """A clear error before allocating caches larger than the device's free memory;
        ``rows``: cache rows per sequence and model name (``"target"``, ``"draft"``)."""
        models = {"target": self.target, "draft": self.draft}
        needs: dict[torch.device, int] = {}  # per device (layers spread by a device_map)
        for name, count in rows.items():
            for device, size in StaticKVCache.bytes_per_device(models[name], count,
                                                                batch_size).items():
                needs[device] = needs.get(device, 0) + size
        for device, need in needs.items():
            if device.type == "cuda":
                available = torch.cuda.mem_get_info(device)[0]
            else:
                try:
                    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
                except (ValueError, OSError, AttributeError):
                    continue
            if need > available and batch_size > 1:
                raise ValueError(f"a batch of {batch_size} sequences of up to {rows['target']} "
                                 f"cache rows needs {need / 2**30:.1f} GiB of KV cache on "
                                 f"{device}, more than the {available / 2**30:.1f} GiB "
                                 f"available there; split the batch or lower max_new_tokens")
            if need > available:
                raise ValueError(f"prompt + max_new_tokens ({rows['target']} cache rows) needs "
                                 f"{need / 2**30:.1f} GiB of KV cache on {device}, more than "
                                 f"the {available / 2**30:.1f} GiB available there; "
                                 f"lower max_new_tokens")

    # ------------------------------------------------------------------ pool

    def save_pool(self, path: str | os.PathLike) -> None:
        """Write the candidate pool to ``path`` (safetensors, atomic).

        Tensor parallel (`ouroboros.distributed`): every rank holds the same pool; call this
        on every rank: rank 0 writes, the others wait at a barrier until it is done."""
        if self.pool is None:
            raise ValueError(f"method {self.config.name!r} keeps no candidate pool")
        try:
            if distributed.is_writer(self.target):
                self.pool.save(path)
        finally:  # also after a failed write: the other ranks must not wait forever
            distributed.barrier(self.target)

    def load_pool(self, path: str | os.PathLike) -> None:
        """Replace the candidate pool by one saved with `save_pool` (same vocabulary, W, N)."""
        if self.pool is None:
            raise ValueError(f"method {self.config.name!r} keeps no candidate pool")
        from ouroboros_kernels import CandidatePool

        self.pool = CandidatePool.load(path, self.device, vocab_size=self.pool.vocab_size,
                                       capacity=self.pool.capacity,
                                       phrase_len=self.pool.phrase_len)

    def clear_pool(self) -> None:
        """Forget every phrase."""
        if self.pool is not None:
            self.pool.clear()

    # ------------------------------------------------------------------ decoding

    def _planner(self):
        """The per-step tree planner of one call (None: the configuration's fixed tree):
        adaptive trees need the measured pass costs; with tuning off they stay fixed."""
        if self.config.adaptive and self.measurements is not None:
            return planner_for(self.config, self.measurements)
        return None

    def _runner(self, name: str, model: torch.nn.Module, rows: int,
                batch_size: int = 1) -> ModelRunner:
        parameter = next(model.parameters())
        cache = self._caches.get(name)
        if cache is None or not cache.fits(batch_size, rows, parameter.dtype,
                                           parameter.device):
            self._caches.pop(name, None)  # free the old buffers before allocating new ones
            cache = StaticKVCache.for_model(model, rows, batch_size)
            self._caches[name] = cache
        cache.reset()
        return ModelRunner(model, cache, cache_kwarg_name(model), self.backend)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
                 max_new_tokens: int = 128, *, attention_mask: torch.Tensor | None = None,
                 pad_token_id: int | None = None,
                 do_sample: bool | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None,
                 seed: int | Sequence[int] | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 eos_token_id: int | Sequence[int] | None = None,
                 stop: Callable | None = None,
                 streamer: Callable | object | None = None,
                 ignore_generation_config: bool = False,
                 ) -> GenerationResult | BatchGenerationResult:
        """Generate up to ``max_new_tokens`` tokens after ``input_ids``: one sequence, or a
        batch whose every row is decoded exactly as it would be alone.

        Args:
            input_ids: one prompt: ``int64[1, S]`` (or ``[S]``, or a list of ints), S >= 1;
                or a batch: ``int64[B, S]`` left-padded with an ``attention_mask``, or a
                list of B token lists of any lengths.
            max_new_tokens: >= 1 per row; never exceeded, even when one step accepts many
                tokens.
            attention_mask: ``[B, S]``, 1 for a token, 0 for left padding (as transformers'
                ``generate`` takes it); given, the call is a batch.
            pad_token_id: the padding of a batch's ``sequences`` (default: the target's
                generation config's, else its config's, else the first EOS id, else 0).
            do_sample, temperature, top_k, top_p: greedy by default (identical to
                ``target.generate(do_sample=False)``); with ``do_sample=True`` (or a
                temperature > 0) tokens are drawn from the target's processed distribution.
            seed / generator: randomness of sampling: a ``torch.Generator`` (any device),
                or a seed for a new one (neither: a nondeterministic seed). One uniform per
                output position is drawn up front, so a seed gives the same text with every
                method (see `ouroboros.sampling`). A batch takes one seed (every row draws
                from a generator of that seed: a row's text is its text decoded alone with
                that seed), a list of B seeds, one generator (the rows draw from it in row
                order) or a list of B generators.
            eos_token_id: id or ids ending generation (emitted, then stop); None: the
                target's generation config. ``[]`` disables it.
            stop: ``stop(new_tokens: list[int]) -> bool`` called after every emitted token
                (a batch: ``stop(row, new_tokens)``); True ends that row after that token.
            streamer: called with each accepted chunk (``list[int]``) as soon as it is
                committed (a batch: ``streamer(row, chunk)``); for one sequence, an object
                with ``put``/``end`` (transformers' streamers) gets ``put(LongTensor
                chunk)`` and ``end()``.
            ignore_generation_config: decode without the target's generation-config
                settings that the engine does not apply (see `generation_rules`); by
                default they raise a ValueError naming them.

        Context: one prompt whose ``S + max_new_tokens`` exceeds the model's
        ``max_position_embeddings`` raises a ValueError; in a batch such a row ends alone
        when it reaches the context (``finish_reason == "context"``), the others go on.

        One decoder runs one ``generate`` at a time: a call from another thread waits for
        the running one (the pool and the caches are the decoder's); a call from inside a
        streamer or ``stop`` callback of the same decoder raises a RuntimeError.

        Returns:
            one prompt: `GenerationResult` with ``sequences: int64[1, S + new]`` and
            ``stats``; a batch: `BatchGenerationResult` (``sequences: int64[B, S + N]``
            padded, ``new_tokens`` per row, ``rows`` as decoded alone, total ``stats``).
        """
        if self._owner == threading.get_ident():
            raise RuntimeError("OuroborosDecoder.generate was called again from inside its own "
                               "streamer or stop callback; use a second decoder")
        with self._lock:
            self._owner = threading.get_ident()
            force = self.config.force_architecture
            try:
                with contextlib.ExitStack() as stack:
                    stack.enter_context(ouroboros_attention(self.target, force=force))
                    if self.draft is not None:
                        stack.enter_context(ouroboros_attention(self.draft, force=force))
                    return self._generate(
                        input_ids, max_new_tokens, attention_mask, pad_token_id, do_sample,
                        temperature, top_k, top_p, seed, generator, eos_token_id, stop,
                        streamer, ignore_generation_config)
            finally:
                self._owner = None

    def _context_limit(self) -> int | None:
        limits = [getattr(model.config, "max_position_embeddings", None)
                  for model in (self.target, self.draft) if model is not None]
        limits = [limit for limit in limits if limit is not None]
        return min(limits) if limits else None

    def _pad_id(self, pad_token_id: object, eos: frozenset) -> int:
        if pad_token_id is None:
            for source in (getattr(self.target, "generation_config", None), self.target.config):
                value = getattr(source, "pad_token_id", None) if source is not None else None
                if isinstance(value, (list, tuple)):
                    value = value[0] if value else None
                if value is not None:
                    pad_token_id = value
                    break
        if pad_token_id is None:
            pad_token_id = min(eos) if eos else 0
        pad_token_id = _token_id(pad_token_id, "pad_token_id")
        if not 0 <= pad_token_id < self.target.config.vocab_size:
            raise ValueError(f"pad_token_id must lie in [0, {self.target.config.vocab_size}), "
                             f"got {pad_token_id}")
        return pad_token_id

    def _generators(self, count: int, seed: object, generator: object,
                    create: bool = True) -> list | None:
        """One generator per row (sampling); with ``create=False`` only the arguments are
        checked (greedy decoding draws nothing) and None is returned."""
        if generator is not None:
            if isinstance(generator, torch.Generator):
                return [generator] * count
            if not isinstance(generator, Sequence) or \
                    any(not isinstance(g, torch.Generator) for g in generator):
                raise TypeError(f"generator must be a torch.Generator, a list of them or "
                                f"None, got {type(generator).__name__}")
            if len(generator) != count:
                raise ValueError(f"generator lists {len(generator)} generators for a batch "
                                 f"of {count}")
            return list(generator)
        if seed is None or isinstance(seed, int):
            seeds = [seed] * count
        elif isinstance(seed, Sequence) and not isinstance(seed, (str, bytes)):
            seeds = list(seed)
            if len(seeds) != count:
                raise ValueError(f"seed lists {len(seeds)} seeds for a batch of {count}")
        else:
            raise TypeError(f"seed must be an int, a list of ints or None, got {seed!r}")
        for value in seeds:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"seed must be an int, a list of ints or None, got {value!r}")
        if not create:
            return None
        generators = []
        for value in seeds:
            made = torch.Generator(device=self.device)
            if value is None:
                made.seed()
            else:
                made.manual_seed(value)
            generators.append(made)
        return generators

    def _generate(self, input_ids, max_new_tokens, attention_mask, pad_token_id, do_sample,
                  temperature, top_k, top_p, seed, generator, eos_token_id, stop, streamer,
                  ignore_generation_config) -> GenerationResult | BatchGenerationResult:
        config = self.config
        batch = is_batch(input_ids, attention_mask)
        prompts = batch_prompts(input_ids, attention_mask) if batch \
            else [_prompt_tokens(input_ids)]
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
                max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        vocab = self.target.config.vocab_size
        for b, prompt in enumerate(prompts):
            if min(prompt) < 0 or max(prompt) >= vocab:
                where = f"input_ids row {b}" if batch else "input_ids"
                raise ValueError(f"{where} must lie in [0, {vocab}) (the vocabulary), got "
                                 f"values in [{min(prompt)}, {max(prompt)}]")
        limit = self._context_limit()
        if not batch:
            for name, model in (("target", self.target), ("draft", self.draft)):
                model_limit = getattr(model.config, "max_position_embeddings", None) \
                    if model else None
                if model_limit is not None and len(prompts[0]) + max_new_tokens > model_limit:
                    raise ValueError(f"prompt ({len(prompts[0])} tokens) + max_new_tokens "
                                     f"({max_new_tokens}) exceeds the {name}'s context of "
                                     f"{model_limit} tokens")
        # Per row: new tokens it may produce (a batch row ends at the context).
        rooms = [max_new_tokens if limit is None else min(max_new_tokens, limit - len(prompt))
                 for prompt in prompts]
        sampling = SamplingParams.from_arguments(do_sample, temperature, top_k, top_p)
        if sampling.do_sample:
            sampling = sampling_from_generation_config(
                self.target, sampling, temperature, top_k, top_p, ignore_generation_config)
        if not batch:
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
                raise TypeError(f"seed must be an int or None, got {seed!r}")
            if generator is not None and not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator or None, got "
                                f"{type(generator).__name__}")
        generators = self._generators(len(prompts), seed, generator,
                                      create=sampling.do_sample)
        eos = _eos_ids(self.target, eos_token_id)
        pad = self._pad_id(pad_token_id, eos) if batch else None
        if stop is not None and not callable(stop):
            raise TypeError(f"stop must be callable, got {type(stop).__name__}")
        if streamer is not None and hasattr(streamer, "put"):
            if batch:
                raise TypeError("streamer: an object with put()/end() (a transformers "
                                "streamer) streams one sequence; for a batch pass a callable "
                                "streamer(row, chunk)")
        elif streamer is not None and not callable(streamer):
            raise TypeError("streamer must be callable or have put()/end() methods")
        live = [b for b, room in enumerate(rooms) if room >= 1]
        longest = max((len(prompts[b]) + rooms[b] for b in live), default=0)
        for name, model in (("target", self.target), ("draft", self.draft)):
            if model is not None:
                check_features(model, name, longest)
        total = longest + config.cache_margin
        rows = {"target": total + config.largest_target_tree}
        if self.draft is not None:
            rows["draft"] = total + config.gamma + config.largest_draft_tree
        if config.compile:  # fewer cache sizes, fewer compiled shapes (ouroboros.compiled)
            from ouroboros.compiled import cache_rows

            rows = {name: cache_rows(count) for name, count in rows.items()}
        self._check_memory(rows, max(len(live), 1))

        session_rows = []
        for b, prompt in enumerate(prompts):
            row_stop = stop
            if stop is not None and batch:
                def row_stop(new_tokens, _b=b):
                    return stop(_b, new_tokens)
            row = Row(index=b, tokens=list(prompt), prompt_length=len(prompt),
                      max_new_tokens=max(rooms[b], 0),
                      stop_rules=StopRules(max(rooms[b], 0), eos, row_stop),
                      stats=GenerationStats(),
                      rules=generation_rules(self.target, len(prompt), eos,
                                             ignore_generation_config),
                      context_limited=rooms[b] < max_new_tokens)
            if rooms[b] < 1:
                row.done = True
                row.stats.finish_reason = "context"
            session_rows.append(row)
        if generators is not None:
            size = max_new_tokens + config.largest_target_tree + 1
            for row, made in zip(session_rows, generators):
                row.uniforms = torch.rand(size, generator=made, dtype=torch.float64,
                                          device=made.device).to(self.device)
        if live:
            target = self._runner("target", self.target, rows["target"], len(live))
            draft = self._runner("draft", self.draft, rows["draft"], len(live)) \
                if self.draft is not None else None
        else:
            target = draft = None
        if self.pool is not None and not config.warm_start:
            self.pool.clear()
        session = Session(config=config, target=target, draft=draft, pool=self.pool,
                          sampling=sampling, rows=session_rows)
        for row in session_rows:
            if row.done:
                continue
            row.planner = self._planner()
            if self.pool is not None and config.seed_pool_from_prompt:
                row.stats.prompt_ngrams = session.insert_sequence_ngrams(row.tokens)
            if config.window:
                window = JacobiWindow.from_prompt(row.tokens, config.phrase_len,
                                                  config.window_size, config.window_seed)
                if draft is not None:
                    row.draft_window = window
                else:
                    row.target_window = window

        callback = None
        if streamer is not None and batch:
            callback = streamer
        elif streamer is not None and hasattr(streamer, "put"):
            def callback(_row: int, chunk: list[int]) -> None:
                streamer.put(torch.tensor(chunk, dtype=torch.int64))
        elif streamer is not None:
            def callback(_row: int, chunk: list[int]) -> None:
                streamer(chunk)
        make_step = None
        if config.step == "device":
            from ouroboros.device_step import DeviceStepper, unsupported

            why = unsupported(any(row.rules for row in session_rows))
            if why is not None:
                raise ValueError(f"config.step='device' cannot run this call: {why}; use "
                                 f"step='host'")
            make_step = DeviceStepper
            if config.compile:  # the passes after the (eager) prefill, captured
                from ouroboros.compiled import compiled_stepper, resolve_mode

                make_step = compiled_stepper(resolve_mode(config.compile, self.device))
        if live:
            run_generation(session, callback, make_step)
        else:  # every row was at the end of the context already
            for row in session_rows:
                session.stats.add(row.stats)
        distributed.check_ranks_agree(  # tensor parallel only
            self.target, [t for row in session_rows for t in row.tokens])
        if streamer is not None and hasattr(streamer, "end"):
            streamer.end()
        results = [GenerationResult(torch.tensor([row.tokens], dtype=torch.int64,
                                                 device=self.device),
                                    row.prompt_length, row.stats) for row in session_rows]
        if not batch:
            return results[0]
        return self._batch_result(input_ids, prompts, session, results, pad)

    def _batch_result(self, input_ids, prompts: list[list[int]], session: Session,
                      results: list[GenerationResult], pad: int) -> BatchGenerationResult:
        new_tokens = [row.generated for row in session.rows]
        widest = max(len(tokens) for tokens in new_tokens)
        if isinstance(input_ids, torch.Tensor):
            head = input_ids.to(device=self.device, dtype=torch.int64)
        else:
            width = max(len(prompt) for prompt in prompts)
            head = torch.tensor([[pad] * (width - len(prompt)) + prompt for prompt in prompts],
                                dtype=torch.int64, device=self.device)
        tail = torch.tensor([tokens + [pad] * (widest - len(tokens)) for tokens in new_tokens],
                            dtype=torch.int64, device=self.device).reshape(len(prompts), widest)
        return BatchGenerationResult(torch.cat([head, tail], dim=1), new_tokens, results,
                                     session.stats, [len(prompt) for prompt in prompts], pad)


def generate(target: torch.nn.Module, draft: torch.nn.Module | None,
             input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
             max_new_tokens: int = 128, config: OuroborosConfig | str | None = None,
             **kwargs) -> GenerationResult | BatchGenerationResult:
    """Generate with a fresh `OuroborosDecoder` (cold pool; ``config=None``: the tuned,
    adaptive default, measured once per device and pair and cached); one prompt or a batch,
    ``kwargs`` as in `OuroborosDecoder.generate` (attention_mask, sampling, eos_token_id,
    stop, streamer, seed)."""
    decoder = OuroborosDecoder(target, draft, config)
    return decoder.generate(input_ids, max_new_tokens, **kwargs)
