"""CLI user errors: one line ``ouroboros: error: <message>`` on stderr, exit status 2, a
traceback only with ``--debug``; plus ``generate --threads`` and ``--force-architecture``.

Runs ``main(argv)`` in-process on tiny random models saved to temporary directories (one
subprocess run checks the real exit status and stderr)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from engine_models import single_thread, tiny_llama, word_tokenizer  # noqa: F401

from ouroboros import cli
from ouroboros.cli import CLIError, main

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Tiny models: ``m48`` (vocab 48), ``m40`` (vocab 40), ``mistral`` (an unverified
    architecture, vocab 48), ``bad.gguf`` (no GGUF magic) and ``trunc.gguf`` (a header cut
    short)."""
    from transformers import MistralConfig, MistralForCausalLM

    root = tmp_path_factory.mktemp("cli_errors")
    for name, vocab, seed in (("m48", 48, 0), ("m40", 40, 1)):
        word_tokenizer(vocab).save_pretrained(root / name)
        tiny_llama(seed, vocab=vocab).save_pretrained(root / name)
    config = MistralConfig(vocab_size=48, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0, sliding_window=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    mistral = MistralForCausalLM(config).eval()
    mistral.generation_config.eos_token_id = None
    word_tokenizer(48).save_pretrained(root / "mistral")
    mistral.save_pretrained(root / "mistral")
    (root / "bad.gguf").write_bytes(b"this is not a gguf file")
    (root / "trunc.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little")
                                      + (5).to_bytes(8, "little") + b"\x02\x00")
    return root


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("OUROBOROS_CACHE_DIR", str(tmp_path / "cache"))


def generate_args(dirs, *extra, target="m48", draft="m48"):
    args = ["generate", "--target", str(dirs / target), "--prompt", "w1 w2 w3",
            "--device", "cpu", "--max-new-tokens", "4"]
    if draft is not None:
        args += ["--draft", str(dirs / draft)]
    return args + list(extra)


def user_error(argv, capsys) -> str:
    """Run ``main(argv)``: it must fail with status 2 and one error line, no traceback;
    returns the message."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert isinstance(info.value, CLIError)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("ouroboros: error: ")]
    assert len(lines) == 1, err
    assert err.rstrip("\n").splitlines()[-1] == lines[0]
    return lines[0].removeprefix("ouroboros: error: ")


def test_missing_model_paths(dirs, capsys):
    message = user_error(["generate", "--target", "/x", "--prompt", "w1", "--method",
                          "greedy"], capsys)
    assert message == "--target: no model at /x"
    message = user_error(generate_args(dirs, draft=None) + ["--draft", "/nope/draft"], capsys)
    assert message == "--draft: no model at /nope/draft"


@pytest.mark.parametrize("name, reason", [("bad.gguf", "magic"), ("trunc.gguf", "")])
def test_bad_gguf_file(dirs, name, reason, capsys):
    message = user_error(["generate", "--target", str(dirs / name), "--prompt", "w1",
                          "--method", "greedy", "--device", "cpu"], capsys)
    assert message.startswith(f"--target: cannot read the GGUF file {dirs / name}")
    assert reason in message


def test_cuda_device_without_cuda(dirs, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = generate_args(dirs)
    args[args.index("--device") + 1] = "cuda"
    message = user_error(args, capsys)
    assert message.startswith("--device: ") and "CUDA is not available" in message
    message = user_error(generate_args(dirs, "--dtype", "int8"), capsys)
    assert message.startswith("--dtype: ")


@pytest.mark.parametrize("value", ["0", "-3"])
def test_max_new_tokens_must_be_positive(dirs, value, capsys):
    args = generate_args(dirs)
    args[args.index("--max-new-tokens") + 1] = value
    assert user_error(args, capsys) == f"--max-new-tokens must be >= 1, got {value}"


def test_vocab_mismatch(dirs, capsys):
    message = user_error(generate_args(dirs, draft="m40"), capsys)
    assert "vocab sizes differ (draft 40, target 48)" in message


def test_invalid_config_value(dirs, capsys):
    assert user_error(generate_args(dirs, "--set", "gamma=0"), capsys) == \
        "--set: gamma must be an int >= 1, got 0"
    message = user_error(generate_args(dirs, "--set", "attention_backend=magic"), capsys)
    assert message.startswith("--set: attention_backend must be one of")


@pytest.mark.parametrize("item, expected", [
    ("name=x", "--set name: not settable"),
    ("colour=blue", "--set expects FIELD=VALUE"),
    ("gamma", "--set expects FIELD=VALUE"),
    ("gamma=abc", "--set gamma: expected an integer, got 'abc'"),
    ("window=maybe", "--set window: expected true/false, got 'maybe'"),
])
def test_bad_set_items(dirs, item, expected, capsys):
    assert user_error(generate_args(dirs, "--set", item), capsys).startswith(expected)


def test_negative_temperature_is_an_error(dirs, capsys):
    message = user_error(generate_args(dirs, "--temperature", "-1"), capsys)
    assert message == "--temperature must be >= 0 (0: greedy), got -1.0"


@pytest.mark.parametrize("extra", [["--top-k", "5"], ["--top-p", "0.9"],
                                   ["--temperature", "0", "--top-k", "5"]])
def test_sampling_flags_need_a_temperature(dirs, extra, capsys):
    message = user_error(generate_args(dirs, *extra), capsys)
    assert "need(s) sampling" in message and "--temperature > 0" in message
    assert extra[-2] in message


def test_bad_sampling_values(dirs, capsys):
    assert user_error(generate_args(dirs, "--temperature", "1", "--top-p", "1.5"),
                      capsys).startswith("--top-p must lie in (0, 1]")
    assert user_error(generate_args(dirs, "--temperature", "1", "--top-k", "-2"),
                      capsys).startswith("--top-k must be >= 0")


def test_architecture_refusal_names_the_cli_flag(dirs, capsys, monkeypatch):
    import ouroboros.attention

    # Mistral may be on the verified list: take it off, so that it stands for an unverified one.
    monkeypatch.setattr(ouroboros.attention, "VERIFIED_ARCHITECTURES", ("LlamaForCausalLM",))
    message = user_error(generate_args(dirs, "--method", "greedy", target="mistral",
                                       draft=None), capsys)
    assert "MistralForCausalLM" in message and "--force-architecture" in message
    assert "force=True" not in message and "OuroborosConfig(" not in message
    # The flag is accepted and lets the unverified architecture run.
    assert main(generate_args(dirs, "--method", "greedy", "--force-architecture",
                              target="mistral", draft=None)) == 0
    out, _ = capsys.readouterr()
    assert out.strip()


def test_debug_shows_the_traceback(dirs, capsys):
    for args in (["--debug"] + generate_args(dirs, "--set", "gamma=0"),
                 generate_args(dirs, "--set", "gamma=0", "--debug")):
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" in err
        assert err.rstrip("\n").splitlines()[-1] == \
            "ouroboros: error: --set: gamma must be an int >= 1, got 0"


def test_unexpected_exceptions_keep_their_traceback(dirs, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_load", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(generate_args(dirs))


def test_threads_set_before_loading(dirs, monkeypatch, capsys):
    events = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: events.append(("threads", n)))
    real_load = cli._load

    def load(*args, **kwargs):
        events.append(("load",))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(cli, "_load", load)
    assert main(generate_args(dirs, "--threads", "3")) == 0
    assert events[0] == ("threads", 3) and ("load",) in events
    capsys.readouterr()
    assert user_error(generate_args(dirs, "--threads", "0"), capsys) == \
        "--threads must be >= 1, got 0"


def test_demo_user_errors(dirs, capsys, monkeypatch):
    assert user_error(["demo", "--target", "/x"], capsys) == "--target: no model at /x"
    assert user_error(["demo", "--threads", "-1"], capsys) == "--threads must be >= 1, got -1"
    assert user_error(["demo", "--set", "gamma=0"], capsys) == \
        "--set: gamma must be an int >= 1, got 0"
    assert user_error(["demo", "--set", "name=x"], capsys).startswith("--set name:")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert user_error(["demo", "--device", "cuda"], capsys).startswith("--device: ")


def test_process_exit_status_and_one_stderr_line(tmp_path):
    env = dict(os.environ, OUROBOROS_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "ouroboros.cli", "generate", "--target",
                           str(tmp_path / "missing"), "--prompt", "w1", "--method", "greedy"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"ouroboros: error: --target: no model at "
                                        f"{tmp_path / 'missing'}"]
    assert proc.stdout == ""


def test_config_from_overrides_parses_and_validates():
    from ouroboros.config import OuroborosConfig, OverrideError

    config = OuroborosConfig.from_overrides([" gamma = 8", "window=on", "attention_backend=none",
                                             "gamma=7"], method="speculative", num_suffixes=2)
    assert (config.name, config.gamma, config.window, config.num_suffixes) == \
        ("speculative", 7, True, 2)  # the last gamma wins; keyword fields win over strings
    assert config.attention_backend is None
    assert OuroborosConfig.from_overrides([]) == OuroborosConfig.preset("ouroboros")
    assert OuroborosConfig.parse_overrides(["use_draft=no", "ngram=3"]) == \
        {"use_draft": False, "ngram": 3}
    for item, message in (("colour=blue", "expects FIELD=VALUE with FIELD one of"),
                          ("gamma", "expects FIELD=VALUE"),
                          ("name=x", "name: not settable"),
                          ("gamma=abc", "gamma: expected an integer, got 'abc'"),
                          ("window=maybe", "window: expected true/false, got 'maybe'")):
        with pytest.raises(OverrideError, match=message):
            OuroborosConfig.from_overrides([item])
    with pytest.raises(ValueError, match="gamma must be an int >= 1, got 0") as info:
        OuroborosConfig.from_overrides(["gamma=0"])
    assert not isinstance(info.value, OverrideError)  # a refused value, not a syntax error
    with pytest.raises(ValueError, match="method must be one of"):
        OuroborosConfig.from_overrides([], method="fastest")
    with pytest.raises(TypeError, match="iterable of 'FIELD=VALUE' strings"):
        OuroborosConfig.from_overrides("gamma=8")
    with pytest.raises(TypeError, match="'FIELD=VALUE' strings"):
        OuroborosConfig.parse_overrides([("gamma", 8)])


def test_chat_flag_needs_a_chat_template(dirs, capsys):
    message = user_error(generate_args(dirs, "--chat"), capsys)
    assert message.startswith("--chat: the tokenizer") and "no chat template" in message


def test_command_table():
    assert set(cli.COMMANDS) == {"generate", "demo"}
    from ouroboros import demo

    assert cli.COMMANDS["demo"].run is demo.run
    assert cli.COMMANDS["demo"].add_arguments is demo.add_arguments
