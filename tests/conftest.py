"""Test-session settings: one torch thread.

The test models are tiny; on a 2-core machine two OpenMP threads mostly fight each other (and any
other process) and were measured 3-10x slower than one.  One thread also makes float reductions
reproducible run to run.
"""
import os

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402

from navil_utils.reference.fixtures import GOLDEN_VARIANTS  # noqa: E402
from navil_utils.reference.golden import load_golden_case


@pytest.fixture(scope="module", params=GOLDEN_VARIANTS)
def case(request):
    """One golden fixture (model + inputs + reference outputs) per LLM backbone."""
    return load_golden_case(request.param)
