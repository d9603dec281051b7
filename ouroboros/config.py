"""One dataclass configures every decoding method of the engine.

Greedy decoding, classic speculative decoding, lookahead decoding and Ouroboros are
*presets* of `OuroborosConfig`: they run through the same loop (`ouroboros.generate`),
so every comparison and every ablation is one flag on one code path.

Notation (the paper's; docs/architecture.md §2): ``gamma`` (γ) draft tokens per step, ``ngram``
(N) the n-gram level (pool phrases hold L = N - 1 tokens after their key token),
``pool_capacity`` (W) phrases kept per key, ``num_suffixes`` (K) pool phrases verified
after the draft.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["ATTENTION_BACKENDS", "PRESETS", "OuroborosConfig", "OverrideError"]

ATTENTION_BACKENDS = ("triton", "reference")
STEPS = ("host", "device")  # OuroborosConfig.step
COMPILE_MODES = ("default", "reduce-overhead", "aot_eager")  # OuroborosConfig.compile
PRESETS = ("greedy", "speculative", "lookahead", "ouroboros")


class OverrideError(ValueError):
    """A ``FIELD=VALUE`` string that does not parse (`OuroborosConfig.parse_overrides`):
    no ``=``, a FIELD that is not a settable field, or a VALUE of the wrong kind. The
    message names the field (``"gamma: expected an integer, got 'x'"``) or, for an unknown
    one, lists the settable fields (``"expects FIELD=VALUE with FIELD one of ..."``)."""


@dataclass
class OuroborosConfig:
    """Configuration of the decoding engine (defaults: the ``ouroboros`` preset).

    Drafting:
        use_draft: run the draft model (``False``: the target drafts for itself from the
            pool and its Jacobi window, as in lookahead decoding, or not at all: greedy).
        gamma: γ, draft tokens verified per step, as one chain. Default 6.
        draft_phrases: pool phrases keyed by the current last token tried in each draft
            forward pass (phrase-level drafting); 0 drafts token by token. Default 4.
        window: run a Jacobi window (lookahead decoding's lookahead branch) in the model
            that drafts (the draft model, or the target when ``use_draft`` is False); each
            pass turns its trajectory into fresh n-grams for the pool. Default off.
        window_size: columns of the Jacobi window (it has L = ngram - 1 rows). Default 4.

    Candidate pool:
        ngram: N; pool phrases hold ``ngram - 1`` tokens. Default 4.
        pool_capacity: W, phrases kept per key token (least recently inserted evicted).
            Default 16.
        num_suffixes: K, the most recent pool phrases keyed by the last draft token,
            verified as branches after the draft chain (trie-merged). Default 4.
        root_phrases: pool phrases keyed by the last committed token, verified beside the
            draft chain (what lookahead decoding verifies): they still pay off when the
            draft's first token is wrong. Default 0 (the paper's tree).
        seed_pool_from_prompt: insert the prompt's n-grams before decoding. Default on.
        pool_from_output: insert the n-grams of every committed chunk. Default on.
        inspiration: insert n-grams of the target's predictions along the rejected tail
            of the draft (candidate inspiration). Default on.
        refinement: overwrite each verified suffix in place with the target's corrected
            version (candidate refinement). Default on.
        warm_start: keep the pool across ``generate`` calls of one `OuroborosDecoder`
            (``False``: cleared at the start of each call). Default on.

    Engine:
        adaptive: choose every step's tree inside this configuration's envelope (γ, K,
            root phrases and draft phrases at most these values; γ = 0: no draft pass) by
            the expected tokens per second under the sequence's running statistics and the
            measured pass costs (`ouroboros.adaptive`). Default off in the presets; the
            tuned default configuration (``config=None``) turns it on.
        attention_backend: ``"triton"``, ``"reference"`` or ``None`` (``None``: the
            environment variable ``OUROBOROS_ATTENTION_BACKEND`` if set, else Triton for
            CUDA tensors and the PyTorch reference for CPU tensors).
        force_architecture: allow models other than the verified ``LlamaForCausalLM``.
        cache_margin: spare rows in the static KV caches beyond prompt + max_new_tokens +
            the largest tree. Default 8.
        step: ``"host"`` (default): the step that builds each tree on the host, any
            configuration; ``"device"``: the static-shape step with one host read per step
            (`ouroboros.device_step`: every preset, adaptive trees and windows; not the
            generation-config rules).
        compile: run the device step's draft and target passes through ``torch.compile``
            with static shapes (`ouroboros.compiled`; only with ``step="device"``): ``False``
            (default, eager), ``True`` (CUDA graphs on CUDA, inductor elsewhere),
            ``"default"`` (inductor), ``"reduce-overhead"`` (inductor + CUDA graphs) or
            ``"aot_eager"`` (traced, not code-generated: quick to compile, for checking).
            Each pass shape compiles once, on its first use (announced on stderr); the
            prefill stays eager. The output does not change.
        window_seed: seed of the Jacobi window's initial guesses (drawn from the prompt).

    None of these settings changes the output: greedy decoding is token-for-token that of
    ``target.generate(do_sample=False)`` for every configuration, sampling has the target's
    distribution. They only change the speed.
    """

    use_draft: bool = True
    gamma: int = 6
    draft_phrases: int = 4
    window: bool = False
    window_size: int = 4
    ngram: int = 4
    pool_capacity: int = 16
    num_suffixes: int = 4
    root_phrases: int = 0
    seed_pool_from_prompt: bool = True
    pool_from_output: bool = True
    inspiration: bool = True
    refinement: bool = True
    warm_start: bool = True
    adaptive: bool = False
    attention_backend: str | None = None
    force_architecture: bool = False
    cache_margin: int = 8
    window_seed: int = 0
    step: str = "host"
    compile: bool | str = False
    name: str = "ouroboros"

    def __post_init__(self) -> None:
        for field in ("use_draft", "window", "seed_pool_from_prompt", "pool_from_output",
                      "inspiration", "refinement", "warm_start", "force_architecture",
                      "adaptive"):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(f"{field} must be a bool, got {getattr(self, field)!r}")
        minimum = {"gamma": 1 if self.use_draft else 0, "draft_phrases": 0, "window_size": 1,
                   "ngram": 2, "pool_capacity": 1, "num_suffixes": 0, "root_phrases": 0,
                   "cache_margin": 0,
                   "window_seed": 0}
        for field, low in minimum.items():
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{field} must be an int >= {low}, got {value!r}")
        if not self.use_draft and self.gamma != 0:
            raise ValueError(f"gamma must be 0 without a draft model (use_draft=False), got "
                             f"{self.gamma}")
        if self.step not in STEPS:
            raise ValueError(f"step must be one of {STEPS}, got {self.step!r}")
        if not isinstance(self.compile, bool) and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be True, False or one of {COMPILE_MODES}, got "
                             f"{self.compile!r}")
        if self.compile and self.step != "device":
            raise ValueError(f"compile={self.compile!r} needs step='device' (the static-shape "
                             f"step), got step={self.step!r}")
        if self.attention_backend is not None and self.attention_backend not in \
                ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS} or None, "
                             f"got {self.attention_backend!r}")

    # ------------------------------------------------------------------ derived

    @property
    def phrase_len(self) -> int:
        """L = N - 1, tokens per pool phrase."""
        return self.ngram - 1

    @property
    def uses_pool(self) -> bool:
        """Whether any part of the configuration reads or writes the candidate pool."""
        drafting_from_pool = self.use_draft and self.draft_phrases > 0
        return drafting_from_pool or self.num_suffixes > 0 or self.root_phrases > 0 \
            or self.window

    @property
    def largest_draft_tree(self) -> int:
        """Most tokens one draft forward pass can feed (pending + phrases + window; see
        `ouroboros.geometry.draft_pass_tokens`)."""
        from ouroboros.geometry import draft_pass_tokens

        return draft_pass_tokens(self)

    @property
    def largest_target_tree(self) -> int:
        """Most tokens one target verification pass can feed (pending + draft + pool
        phrases + window; see `ouroboros.geometry.target_pass_tokens`)."""
        from ouroboros.geometry import target_pass_tokens

        return target_pass_tokens(self)

    def replace(self, **changes) -> OuroborosConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets

    @classmethod
    def preset(cls, name: str, **overrides) -> OuroborosConfig:
        """The configuration of a named method, with optional field overrides.

        * ``greedy``: the target alone, one token per forward pass.
        * ``speculative``: the classic method: the draft model writes a chain of ``gamma``
          tokens token by token, the target verifies it; no pool.
        * ``lookahead``: no draft model: the target verifies pool phrases keyed by the last
          token and runs a Jacobi window that feeds the pool (lookahead decoding).
        * ``ouroboros``: phrase-level drafting with the pool, candidate suffixes,
          inspiration, refinement, warm start (the defaults of this class).
        """
        if name not in PRESETS:
            raise ValueError(f"method must be one of {PRESETS}, got {name!r}")
        base: dict = {"name": name}
        if name == "greedy":
            base.update(use_draft=False, gamma=0, draft_phrases=0, num_suffixes=0,
                        window=False, seed_pool_from_prompt=False, pool_from_output=False,
                        inspiration=False, refinement=False)
        elif name == "speculative":
            base.update(use_draft=True, gamma=4, draft_phrases=0, num_suffixes=0,
                        window=False, seed_pool_from_prompt=False, pool_from_output=False,
                        inspiration=False, refinement=False)
        elif name == "lookahead":
            base.update(use_draft=False, gamma=0, draft_phrases=0, num_suffixes=4,
                        window=True, window_size=4, ngram=4, inspiration=False,
                        refinement=False, seed_pool_from_prompt=False, pool_from_output=False)
        base.update(overrides)
        return cls(**base)

    # ------------------------------------------------------------------ FIELD=VALUE strings

    @classmethod
    def parse_overrides(cls, items: Iterable[str]) -> dict[str, object]:
        """Parse ``FIELD=VALUE`` strings (the CLI's ``--set``) into ``{field: value}``.

        FIELD is any field but ``name`` (the preset names the configuration); VALUE is
        read by the field's type: ``true/false/1/0/yes/no/on/off`` for a bool, an integer
        for an int, the text for a str (``none`` for None). Whitespace around both is
        ignored; a field given twice keeps the last value. Only the syntax is checked here
        (`from_overrides` also validates the values). Raises `OverrideError` (a
        ValueError) naming the field, TypeError when ``items`` is not an iterable of str.
        """
        if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
            raise TypeError(f"items must be an iterable of 'FIELD=VALUE' strings, got "
                            f"{type(items).__name__}")
        types = {f.name: str(f.type) for f in dataclasses.fields(cls) if f.name != "name"}
        overrides: dict[str, object] = {}
        for item in items:
            if not isinstance(item, str):
                raise TypeError(f"items must be 'FIELD=VALUE' strings, got {item!r}")
            name, sep, value = item.partition("=")
            name, value = name.strip(), value.strip()
            if name == "name":
                raise OverrideError("name: not settable (the method names the configuration)")
            if not sep or name not in types:
                raise OverrideError(f"expects FIELD=VALUE with FIELD one of "
                                    f"{', '.join(sorted(types))}; got {item!r}")
            kind = types[name]
            if "bool" in kind and "str" in kind:  # a flag or a mode name (compile)
                lowered = value.lower()
                if lowered in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    overrides[name] = lowered in ("true", "1", "yes", "on")
                else:
                    overrides[name] = value
            elif "bool" in kind:
                if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise OverrideError(f"{name}: expected true/false, got {value!r}")
                overrides[name] = value.lower() in ("true", "1", "yes", "on")
            elif "int" in kind:
                try:
                    overrides[name] = int(value)
                except ValueError:
                    raise OverrideError(f"{name}: expected an integer, got {value!r}") from None
            elif "str" in kind:
                overrides[name] = None if value.lower() == "none" else value
            else:  # a field type this parser does not know: refuse rather than pass a string
                raise OverrideError(f"{name}: cannot be set from a FIELD=VALUE string")
        return overrides

    @classmethod
    def from_overrides(cls, items: Iterable[str], *, method: str = "ouroboros",
                       **fields) -> OuroborosConfig:
        """The validated configuration of preset ``method`` with ``FIELD=VALUE`` strings
        applied (`parse_overrides`), then the keyword ``fields`` (which win).

        ``OuroborosConfig.from_overrides(["gamma=8", "window=on"], method="ouroboros")``.
        Raises `OverrideError` for a string that does not parse, and the configuration's
        own ValueError / TypeError, naming the field, for a value it refuses
        (``"gamma must be an int >= 1, got 0"``) or an unknown ``method``.
        """
        return cls.preset(method, **{**cls.parse_overrides(items), **fields})


def backend_from_environment() -> str | None:
    """``OUROBOROS_ATTENTION_BACKEND`` (``triton`` or ``reference``), or None when unset."""
    value = os.environ.get("OUROBOROS_ATTENTION_BACKEND", "").strip().lower()
    if not value:
        return None
    if value not in ATTENTION_BACKENDS:
        raise ValueError(f"OUROBOROS_ATTENTION_BACKEND must be one of {ATTENTION_BACKENDS}, got "
                         f"{value!r}")
    return value
