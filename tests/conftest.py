"""Shared fixtures: megatron-core's patches for every test, and a single-process gloo world with
megatron's model-parallel groups (TP=PP=1)."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def megatron_patches():
    """What every entry point does at start-up; tests build configs and models without one."""
    from megatron_lpa.platform import megatron_patches

    megatron_patches.apply()


@pytest.fixture(scope="session")
def model_parallel():
    """Initialises megatron-core (and its CPU support) once for the in-process unit tests."""
    from megatron_lpa.platform.distributed import destroy_distributed, initialize_distributed

    initialize_distributed()
    yield
    destroy_distributed()


def pytest_collection_modifyitems(config, items):
    """GPU tests (``@pytest.mark.gpu``) are skipped where CUDA is not available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
