"""Shared fixtures: a tiny VQ model (tests/toy_vq.py), seeded RNG, and paths to the shared photos."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from toy_vq import ToyVQ

PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "photos"


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    """The tiny test models run fastest on one thread (thread sync dominates their small convolutions)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def toy_model() -> ToyVQ:
    return ToyVQ().eval()


@pytest.fixture
def spread_toy_model() -> ToyVQ:
    """A toy model whose codes spread over the range of its encoder's features, so cells use several codes."""
    torch.manual_seed(1)
    toy = ToyVQ().eval()
    with torch.no_grad():
        toy.codebook.weight.mul_(0.3)
    return toy


@pytest.fixture
def photos_dir() -> Path:
    if not (PHOTOS / "train").is_dir():
        pytest.skip(f"shared photos not found at {PHOTOS}")
    return PHOTOS


@pytest.fixture
def local_hub():
    """A Hugging Face Hub stand-in on 127.0.0.1 (tests/hub_server.py), stopped after the test."""
    from hub_server import LocalHub

    with LocalHub() as hub:
        yield hub
