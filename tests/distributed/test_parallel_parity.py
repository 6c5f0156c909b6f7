"""TP=2/4 (with and without SP), PP=2, DP=2 and TP2xPP2 give TP=1's loss and gradients, for dense,
LPA, low-rank-everywhere, GPT-style and the paper's GPT-style (output-norm) models with the same
weights and data; a checkpoint written at TP=2 loads at TP=1 and PP=2 with the same loss."""

import pytest

from tests.launch import torchrun

LAYOUTS = {
    "tp2": (2, ["--tp", "2"]),
    "tp2_sp": (2, ["--tp", "2", "--sp"]),
    "tp4": (4, ["--tp", "4"]),
    "tp4_sp": (4, ["--tp", "4", "--sp"]),
    "pp2": (2, ["--pp", "2"]),
    "dp2": (2, []),
    "tp2_pp2_sp": (4, ["--tp", "2", "--pp", "2", "--sp"]),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """TP=1 weights, gradients and losses for every variant."""
    root = tmp_path_factory.mktemp("reference")
    torchrun("distributed/parity_worker.py", 1, "--save-weights", root / "weights",
             "--save-grads", root / "grads", "--loss-file", root / "loss.json")
    return root


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_tp1(reference, layout):
    nproc, flags = LAYOUTS[layout]
    torchrun("distributed/parity_worker.py", nproc, *flags,
             "--load-weights", reference / "weights", "--check-grads", reference / "grads",
             "--loss-file", reference / "loss.json", "--check-loss")


def test_checkpoint_saved_at_tp2_loads_at_tp1_and_pp2(reference, tmp_path):
    saved = tmp_path / "tp2_weights"
    variants = "lpa,dense,paper_gpt"
    torchrun("distributed/parity_worker.py", 2, "--tp", "2", "--variants", variants,
             "--load-weights", reference / "weights", "--save-weights", saved,
             "--loss-file", reference / "loss.json", "--check-loss")
    for nproc, flags in ((1, []), (2, ["--pp", "2"])):
        torchrun("distributed/parity_worker.py", nproc, *flags, "--variants", variants,
                 "--load-weights", saved, "--loss-file", reference / "loss.json", "--check-loss")
