"""``ouroboros demo`` on tiny models saved as Hugging Face directories (the real pair is
exercised by the set-up command, which runs the demo)."""

from __future__ import annotations

import pytest
from engine_models import save_pair, single_thread, tiny_llama, word_tokenizer  # noqa: F401

from ouroboros.cli import build_parser, main
from ouroboros.demo import DEMO_PROMPTS, DemoRow, encode_prompt, format_table

pytestmark = pytest.mark.usefixtures("single_thread")

CHAT_TEMPLATE = ("{% for m in messages %}w1 {{ m['content'] }} w2{% endfor %}"
                 "{% if add_generation_prompt %} w3{% endif %}")


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    """A tiny target and a perturbed draft (vocab 48, word-level tokenizer with a chat
    template)."""
    root = tmp_path_factory.mktemp("demo")
    tokenizer = word_tokenizer(48, CHAT_TEMPLATE)
    target = tiny_llama(0)
    return (*save_pair(root, tokenizer, target), tokenizer)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OUROBOROS_CACHE_DIR", str(tmp_path))


def demo_args(pair_dirs, *extra):
    target, draft, _ = pair_dirs
    return ["demo", "--target", str(target), "--draft", str(draft), "--device", "cpu",
            "--max-new-tokens", "12", "--threads", "1", *extra]


@pytest.mark.parametrize("method", ["ouroboros", "speculative", "lookahead"])
def test_demo_streams_both_texts_and_reports_identical_outputs(pair_dirs, method, capsys):
    assert main(demo_args(pair_dirs, "--prompts", "2", "--method", method)) == 0
    out, err = capsys.readouterr()
    assert "--- greedy (target.generate):" in out and f"--- {method}:" in out
    assert "=== prompt 1/2 (code)" in out and "=== prompt 2/2 (chat)" in out
    assert f"| prompt | new tokens | greedy tok/s | {method} tok/s |" in out
    assert "| **all** | 24 |" in out
    assert "outputs identical: yes" in out and "MISMATCH" not in out
    assert "loading the target" in err and "configuration:" in err
    # Streamed greedy text == streamed method text, prompt by prompt.
    for block in out.split("=== prompt")[1:]:
        greedy = block.split("--- greedy (target.generate):\n")[1].split(f"--- {method}:")[0]
        ours = block.split(f"--- {method}:\n")[1].split(f"[{method}]")[0]
        assert greedy.strip() == ours.strip()


def test_demo_fails_loudly_on_a_mismatch(pair_dirs, capsys, monkeypatch):
    from ouroboros.generate import GenerationResult

    original = GenerationResult.new_tokens

    def corrupted(self):
        tokens = original.fget(self).clone()
        tokens[-1] = (tokens[-1] + 1) % 48
        return tokens

    monkeypatch.setattr(GenerationResult, "new_tokens", property(corrupted))
    assert main(demo_args(pair_dirs, "--prompts", "1", "--no-stream", "--no-tune")) == 1
    out, err = capsys.readouterr()
    assert "!!! MISMATCH on prompt 1" in out
    assert "outputs identical: NO" in out and "outputs identical: NO" in err


def test_demo_options(pair_dirs, capsys):
    assert main(demo_args(pair_dirs, "--prompts", "1", "--no-stream", "--no-tune",
                          "--no-prepack", "--set", "gamma=2")) == 0
    out, err = capsys.readouterr()
    assert "--- greedy" not in out and "outputs identical: yes" in out
    assert "gamma=2" in err
    with pytest.raises(SystemExit, match="--prompts must lie in"):
        main(demo_args(pair_dirs, "--prompts", str(len(DEMO_PROMPTS) + 1)))
    with pytest.raises(SystemExit, match="--set expects"):
        main(demo_args(pair_dirs, "--set", "colour=blue"))
    assert "demo" in build_parser().format_help()


def test_chat_prompts_use_the_chat_template(pair_dirs):
    _, _, tokenizer = pair_dirs
    ids = encode_prompt(tokenizer, "chat", "w7 w8")
    assert tokenizer.decode(ids) == "w1 w7 w8 w2 w3"
    assert encode_prompt(tokenizer, "code", "w7 w8") == tokenizer("w7 w8").input_ids
    kinds = [kind for kind, _ in DEMO_PROMPTS[:3]]
    assert kinds == ["code", "chat", "code"]
    with pytest.raises(ValueError, match="kind must be"):
        encode_prompt(tokenizer, "poem", "w7")


def test_chat_prompt_ids_with_and_without_a_template(pair_dirs):
    from ouroboros.models import chat_prompt_ids

    _, _, tokenizer = pair_dirs
    ids = chat_prompt_ids(tokenizer, "w7 w8")
    assert ids == tokenizer.apply_chat_template([{"role": "user", "content": "w7 w8"}],
                                                add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]
    plain = word_tokenizer(48)  # no chat template: plain encoding, or an error on request
    assert chat_prompt_ids(plain, "w7 w8") == plain("w7 w8").input_ids
    with pytest.raises(ValueError, match="no chat template"):
        chat_prompt_ids(plain, "w7", require_template=True)
    with pytest.raises(TypeError, match="text must be a str"):
        chat_prompt_ids(tokenizer, ["w7"])


def test_format_table_totals():
    rows = [DemoRow("1: code", 100, 4.0, 1.0, 25, True), DemoRow("2: chat", 50, 2.0, 2.0, 50,
                                                                 False)]
    table = format_table(rows, "ouroboros")
    assert "| 1: code | 100 | 25.0 | 100.0 | 4.00 | 4.00x | yes |" in table
    assert "| 2: chat | 50 | 25.0 | 25.0 | 1.00 | 1.00x | NO |" in table
    assert "| **all** | 150 | 25.0 | 50.0 | 2.00 | 2.00x | NO |" in table
