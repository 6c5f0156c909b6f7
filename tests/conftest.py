"""Shared fixtures: a single-process gloo world with megatron's model-parallel groups (TP=PP=1)."""

import pytest


@pytest.fixture(scope="session")
def model_parallel():
    """Initialises megatron-core (and its CPU support) once for the in-process unit tests."""
    from megatron_lpa.platform.distributed import destroy_distributed, initialize_distributed

    initialize_distributed()
    yield
    destroy_distributed()
