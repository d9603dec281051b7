"""Repository tooling beside the runtime package: not installed with ``ouroboros``.

``tools.prompts`` holds the prompt sets of the distillation and the benchmarks;
``tools.distill`` is the pipeline that made the shipped draft
(``python -m tools.distill --help``, run from the repository root). The runtime
(``ouroboros``) never imports anything from here; tools and benchmarks import the runtime.
"""
