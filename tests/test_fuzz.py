"""A fixed slice of the random exactness fuzz (`tests/fuzz_exact.py`; the full run is
``python tests/fuzz_exact.py --cases 1000``)."""

from __future__ import annotations

import random

import pytest
from engine_models import single_thread  # noqa: F401  (a fixture)
from fuzz_exact import random_case, run_case

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("index", range(80))
def test_fuzz_case(index):
    case = random_case(random.Random(1000 + index))
    expected, got = run_case(case)
    assert got == expected, case
