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
    GenerationResult,
    GenerationStats,
    JacobiWindow,
    LogitRules,
    ModelRunner,
    Session,
    StopRules,
    insert_sequence_ngrams,
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


def _prompt_tokens(input_ids: object) -> list[int]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.is_floating_point() or input_ids.is_complex() or \
                input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.dim() == 2:
            if input_ids.shape[0] != 1:
                raise ValueError(f"input_ids has batch size {input_ids.shape[0]}; this version "
                                 "decodes one sequence at a time (batch size 1)")
            input_ids = input_ids[0]
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be [1, S] or [S], got shape "
                             f"{tuple(input_ids.shape)}")
        tokens = input_ids.tolist()
    elif isinstance(input_ids, Sequence) and not isinstance(input_ids, (str, bytes)):
        tokens = list(input_ids)
        if any(isinstance(t, bool) or not isinstance(t, int) for t in tokens):
            raise TypeError("input_ids as a sequence must hold ints (token ids)")
    else:
        raise TypeError(f"input_ids must be a LongTensor [1, S] or a list of ints, got "
                        f"{type(input_ids).__name__}")
    if not tokens:
        raise ValueError("input_ids is empty: the prompt needs at least one token")
    return tokens


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

    def _check_memory(self, rows: dict[str, int]) -> None:
        """A clear error before allocating caches larger than the device's free memory;
        ``rows``: cache rows per model name (``"target"``, ``"draft"``)."""
        models = {"target": self.target, "draft": self.draft}
        needs: dict[torch.device, int] = {}  # per device (layers spread by a device_map)
        for name, count in rows.items():
            for device, size in StaticKVCache.bytes_per_device(models[name], count).items():
                needs[device] = needs.get(device, 0) + size
        for device, need in needs.items():
            if device.type == "cuda":
                available = torch.cuda.mem_get_info(device)[0]
            else:
                try:
                    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
                except (ValueError, OSError, AttributeError):
                    continue
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

    def _runner(self, name: str, model: torch.nn.Module, rows: int) -> ModelRunner:
        parameter = next(model.parameters())
        cache = self._caches.get(name)
        if cache is None or not cache.fits(1, rows, parameter.dtype, parameter.device):
            cache = StaticKVCache.for_model(model, rows)
            self._caches[name] = cache
        cache.reset()
        return ModelRunner(model, cache, cache_kwarg_name(model), self.backend)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor | Sequence[int], max_new_tokens: int = 128, *,
                 do_sample: bool | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, generator: torch.Generator | None = None,
                 eos_token_id: int | Sequence[int] | None = None,
                 stop: Callable[[list[int]], bool] | None = None,
                 streamer: Callable[[list[int]], None] | object | None = None,
                 ignore_generation_config: bool = False,
                 ) -> GenerationResult:
        """Generate up to ``max_new_tokens`` tokens after ``input_ids``.

        Args:
            input_ids: ``int64[1, S]`` (or ``[S]``, or a list of ints), S >= 1.
            max_new_tokens: >= 1; never exceeded, even when one step accepts many tokens.
            do_sample, temperature, top_k, top_p: greedy by default (identical to
                ``target.generate(do_sample=False)``); with ``do_sample=True`` (or a
                temperature > 0) tokens are drawn from the target's processed distribution.
            seed / generator: randomness of sampling: a ``torch.Generator`` (any device),
                or a seed for a new one (neither: a nondeterministic seed). One uniform per
                output position is drawn up front, so a seed gives the same text with every
                method (see `ouroboros.sampling`).
            eos_token_id: id or ids ending generation (emitted, then stop); None: the
                target's generation config. ``[]`` disables it.
            stop: ``stop(new_tokens: list[int]) -> bool`` called after every emitted token;
                True ends generation after that token.
            streamer: called with each accepted chunk (``list[int]``) as soon as it is
                committed; an object with ``put``/``end`` (transformers' streamers) gets
                ``put(LongTensor chunk)`` and ``end()``.
            ignore_generation_config: decode without the target's generation-config
                settings that the engine does not apply (see `generation_rules`); by
                default they raise a ValueError naming them.

        One decoder runs one ``generate`` at a time: a call from another thread waits for
        the running one (the pool and the caches are the decoder's); a call from inside a
        streamer or ``stop`` callback of the same decoder raises a RuntimeError.

        Returns:
            `GenerationResult` with ``sequences: int64[1, S + new]`` and ``stats``.
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
                    return self._generate(input_ids, max_new_tokens, do_sample, temperature,
                                          top_k, top_p, seed, generator, eos_token_id, stop,
                                          streamer, ignore_generation_config)
            finally:
                self._owner = None

    def _generate(self, input_ids, max_new_tokens, do_sample, temperature, top_k, top_p, seed,
                  generator, eos_token_id, stop, streamer,
                  ignore_generation_config) -> GenerationResult:
        config = self.config
        prompt = _prompt_tokens(input_ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
                max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        vocab = self.target.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"input_ids must lie in [0, {vocab}) (the vocabulary), got "
                             f"values in [{min(prompt)}, {max(prompt)}]")
        for name, model in (("target", self.target), ("draft", self.draft)):
            limit = getattr(model.config, "max_position_embeddings", None) if model else None
            if limit is not None and len(prompt) + max_new_tokens > limit:
                raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens "
                                 f"({max_new_tokens}) exceeds the {name}'s context of "
                                 f"{limit} tokens")
        sampling = SamplingParams.from_arguments(do_sample, temperature, top_k, top_p)
        if sampling.do_sample:
            sampling = sampling_from_generation_config(
                self.target, sampling, temperature, top_k, top_p, ignore_generation_config)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got "
                            f"{type(generator).__name__}")
        eos = _eos_ids(self.target, eos_token_id)
        rules = generation_rules(self.target, len(prompt), eos, ignore_generation_config)
        for name, model in (("target", self.target), ("draft", self.draft)):
            if model is not None:
                check_features(model, name, len(prompt) + max_new_tokens)
        total = len(prompt) + max_new_tokens + config.cache_margin
        rows = {"target": total + config.largest_target_tree}
        if self.draft is not None:
            rows["draft"] = total + config.gamma + config.largest_draft_tree
        self._check_memory(rows)
        uniforms = None
        if sampling.do_sample:
            if generator is None:
                generator = torch.Generator(device=self.device)
                if seed is not None:
                    generator.manual_seed(seed)
                else:
                    generator.seed()
            uniforms = torch.rand(max_new_tokens + config.largest_target_tree + 1,
                                  generator=generator, dtype=torch.float64,
                                  device=generator.device).to(self.device)
        if stop is not None and not callable(stop):
            raise TypeError(f"stop must be callable, got {type(stop).__name__}")
        stop_rules = StopRules(max_new_tokens, eos, stop)

        target = self._runner("target", self.target, rows["target"])
        draft = self._runner("draft", self.draft, rows["draft"]) if self.draft is not None \
            else None
        if self.pool is not None and not config.warm_start:
            self.pool.clear()
        session = Session(config=config, target=target, draft=draft, pool=self.pool,
                          sampling=sampling, uniforms=uniforms, tokens=list(prompt),
                          prompt_length=len(prompt), max_new_tokens=max_new_tokens,
                          stats=GenerationStats(), rules=rules)
        session.planner = self._planner()
        if self.pool is not None and config.seed_pool_from_prompt:
            session.stats.prompt_ngrams = insert_sequence_ngrams(session, prompt)
        if config.window:
            window = JacobiWindow.from_prompt(prompt, config.phrase_len, config.window_size,
                                              config.window_seed)
            if draft is not None:
                session.draft_window = window
            else:
                session.target_window = window

        callback = streamer
        if streamer is not None and hasattr(streamer, "put"):
            def callback(chunk: list[int]) -> None:
                streamer.put(torch.tensor(chunk, dtype=torch.int64))
        elif streamer is not None and not callable(streamer):
            raise TypeError("streamer must be callable or have put()/end() methods")
        result = run_generation(session, len(prompt), stop_rules, callback)
        distributed.check_ranks_agree(self.target, session.tokens)  # tensor parallel only
        if streamer is not None and hasattr(streamer, "end"):
            streamer.end()
        return result


def generate(target: torch.nn.Module, draft: torch.nn.Module | None,
             input_ids: torch.Tensor | Sequence[int], max_new_tokens: int = 128,
             config: OuroborosConfig | str | None = None, **kwargs) -> GenerationResult:
    """Generate with a fresh `OuroborosDecoder` (cold pool; ``config=None``: the tuned,
    adaptive default, measured once per device and pair and cached); ``kwargs`` as in
    `OuroborosDecoder.generate` (sampling, eos_token_id, stop, streamer, seed)."""
    decoder = OuroborosDecoder(target, draft, config)
    return decoder.generate(input_ids, max_new_tokens, **kwargs)
