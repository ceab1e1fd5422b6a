"""Shared test fixtures: the devices present, per-test seeds (tolerances: tests/bounds.py).

Every test that runs on a CUDA device carries the ``gpu`` marker: the ones parametrized with the
"cuda" device get it here automatically, the GPU-only ones are marked by hand. On a GPU machine
``pytest -m gpu`` runs exactly the tests that exercise the GPU (benchmarks/gpu_check.sh does).
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any(isinstance(v, (str, torch.device)) and str(v).startswith("cuda") for v in params.values()):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread is as fast, and does not collapse when the cores are shared
    (``QLORA_KERNELS_TEST_THREADS`` sets another count: tests/numerics_sweep.sh runs them with 2 too)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("QLORA_KERNELS_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(saved)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
