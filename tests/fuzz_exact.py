"""Random exactness fuzz: random architectures of the verified table, presets and
configurations, prompts (repetitive or not), budgets, EOS sets, contexts that end right
after the budget and generation-config processors (suppress_tokens, repetition_penalty,
no_repeat_ngram_size), each compared token for token with
``target.generate(do_sample=False)`` (float32).

    python tests/fuzz_exact.py --cases 1000 [--seed 0]

prints the mismatches (with the case to replay) and a closing ``N passed, M failed`` line;
`tests/test_fuzz.py` runs a small fixed slice of it in the suite.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from functools import lru_cache
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine_models import perturbed  # noqa: E402
from test_architectures import ARCHITECTURES, tiny  # noqa: E402

from ouroboros import OuroborosConfig, OuroborosDecoder  # noqa: E402

VOCAB = 48
PRESETS = ("greedy", "speculative", "lookahead", "ouroboros")


@lru_cache(maxsize=None)
def models(architecture: str, context: int, seed: int):
    """(target, {draft kind: draft}) of one architecture and context length."""
    target = tiny(architecture, seed, max_position_embeddings=context)
    drafts = {"same": target, "perturbed": perturbed(target, 0.05, seed=seed + 1),
              "unrelated": tiny(architecture, seed + 100, max_position_embeddings=context)}
    return target, drafts


def random_case(rng: random.Random) -> dict:
    """One case as a plain dict (printable, replayable with `run_case`)."""
    preset = rng.choice(PRESETS)
    new = rng.randint(1, 40)
    prompt_len = rng.randint(1, 30)
    fields = {}
    if preset in ("speculative", "ouroboros"):
        fields["gamma"] = rng.randint(1, 10)
    if preset in ("lookahead", "ouroboros"):
        fields.update(ngram=rng.randint(2, 7), num_suffixes=rng.randint(0, 8),
                      pool_capacity=rng.randint(1, 20), window_size=rng.randint(1, 5))
    if preset == "ouroboros":
        fields.update(draft_phrases=rng.randint(0, 6), window=rng.random() < 0.4,
                      root_phrases=rng.choice([0, 0, 1, 3]))
    return {
        "architecture": rng.choice(sorted(ARCHITECTURES)),
        "model_seed": rng.randint(0, 1),
        # Half the cases end exactly at the model's context.
        "context": prompt_len + new if rng.random() < 0.5 else 256,
        "draft": rng.choice(["same", "perturbed", "unrelated"]),
        "preset": preset, "fields": fields,
        "prompt_seed": rng.randint(0, 10**6), "prompt_len": prompt_len,
        "repeat": rng.random() < 0.5, "new": new,
        "eos_from_output": rng.random() < 0.3,
        "suppress": rng.random() < 0.15,
        "processors": rng.choice([{}] * 6 + [{"repetition_penalty": 1.3},
                                             {"no_repeat_ngram_size": 2},
                                             {"no_repeat_ngram_size": 3},
                                             {"repetition_penalty": 0.8,
                                              "no_repeat_ngram_size": 4}]),
    }


def run_case(case: dict) -> tuple[list, list]:
    """``(expected, got)`` token lists of one case."""
    target, drafts = models(case["architecture"], case["context"], case["model_seed"])
    generator = torch.Generator().manual_seed(case["prompt_seed"])
    length = case["prompt_len"]
    if case["repeat"]:
        base = torch.randint(3, VOCAB, (1, max(1, length // 3)), generator=generator)
        prompt = base.repeat(1, 3 + length)[:, :length]
    else:
        prompt = torch.randint(3, VOCAB, (1, length), generator=generator)
    target.generation_config.suppress_tokens = None
    kwargs = {"eos_token_id": []}
    with torch.no_grad():
        plain = target.generate(prompt, max_new_tokens=case["new"], do_sample=False)
    out = plain[0, length:].tolist()
    if case["eos_from_output"]:
        kwargs["eos_token_id"] = [out[len(out) // 2]]
    if case["suppress"]:
        target.generation_config.suppress_tokens = [out[0]]
    processors = case.get("processors", {})
    for name, value in processors.items():
        setattr(target.generation_config, name, value)
    try:
        with torch.no_grad():
            expected = target.generate(prompt, max_new_tokens=case["new"], do_sample=False,
                                       eos_token_id=kwargs["eos_token_id"] or None).tolist()
        config = OuroborosConfig.preset(case["preset"], attention_backend="reference",
                                        **case["fields"])
        draft = drafts[case["draft"]] if config.use_draft else None
        got = OuroborosDecoder(target, draft, config).generate(
            prompt, case["new"], **kwargs).sequences.tolist()
    finally:
        target.generation_config.suppress_tokens = None
        for name in processors:
            setattr(target.generation_config, name, None)
    return expected, got


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    failed, start = 0, time.perf_counter()
    for index in range(args.cases):
        case = random_case(rng)
        expected, got = run_case(case)
        if expected != got:
            failed += 1
            print(f"MISMATCH case {index}: {case}", flush=True)
        if (index + 1) % 100 == 0:
            print(f"[fuzz] {index + 1}/{args.cases} cases, {failed} mismatches, "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    print(f"fuzz: {args.cases - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
