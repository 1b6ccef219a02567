"""Test-wide settings: no network, fixed seeds, one torch thread per xdist worker."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Two xdist workers share two cores; more threads only contend.
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
