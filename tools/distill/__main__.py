"""``python -m tools.distill STAGE`` (from the repository root): see ``tools.distill``."""

from tools.distill.stages import main

main()
