import os

# The Triton interpreter must be chosen before any kernel module is imported.
# On a machine with a GPU, set OUROBOROS_TEST_GPU=1 to run the kernels compiled.
if os.environ.get("OUROBOROS_TEST_GPU", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
