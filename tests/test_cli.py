"""CLI smoke tests: ``ouroboros generate`` on a tiny model saved as a Hugging Face directory."""

from __future__ import annotations

import pytest
from engine_models import greedy_reference, single_thread, tiny_llama, word_tokenizer  # noqa: F401

from ouroboros.cli import build_parser, main

pytestmark = pytest.mark.usefixtures("single_thread")

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama (vocab 48) with a word-level tokenizer: <pad>=0, <s>=1, </s>=2."""
    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = word_tokenizer(48)
    tokenizer.save_pretrained(folder)
    tiny_llama(0).save_pretrained(folder)
    return folder, tokenizer


@pytest.mark.parametrize("method", ["ouroboros", "lookahead", "speculative", "greedy"])
def test_generate_prints_the_greedy_text_and_stats(model_dir, method, capsys):
    folder, tokenizer = model_dir
    prompt = "w3 w7 w1 w30 w12"
    args = ["generate", "--target", str(folder), "--prompt", prompt, "--method", method,
            "--max-new-tokens", "15", "--device", "cpu", "--set", "gamma=3"]
    if method in ("ouroboros", "speculative"):
        args += ["--draft", str(folder)]
    else:
        args[-1] = "gamma=0"
    assert main(args) == 0
    out, err = capsys.readouterr()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = greedy_reference(model, ids, 15)[0, ids.shape[1]:]  # saved: no EOS
    assert out.strip() == tokenizer.decode(expected, skip_special_tokens=True).strip()
    assert f"[{method}]" in err and "tokens/pass" in err


def test_sampling_and_no_stream(model_dir, capsys):
    folder, _ = model_dir
    args = ["generate", "--target", str(folder), "--draft", str(folder), "--prompt", "w1 w2",
            "--temperature", "0.8", "--top-k", "10", "--seed", "3", "--max-new-tokens", "6",
            "--no-stream", "--device", "cpu"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.strip()


def test_cli_errors(model_dir, capsys):
    folder, _ = model_dir
    with pytest.raises(SystemExit, match="needs --draft") as exit_info:
        main(["generate", "--target", str(folder), "--prompt", "w1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("ouroboros: error: --method ouroboros needs")
    with pytest.raises(SystemExit, match="--set expects FIELD=VALUE") as exit_info:
        main(["generate", "--target", str(folder), "--prompt", "w1", "--method", "greedy",
              "--set", "colour=blue"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "generate" in build_parser().format_help()
    with pytest.raises(SystemExit):
        main(["generate", "--target", str(folder)])  # --prompt missing
