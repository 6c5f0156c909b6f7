"""TP=2/4 (with and without SP), PP=2, DP=2 and TP2xPP2 give TP=1's loss and gradients, for dense,
LPA, low-rank-everywhere, GPT-style and the paper's GPT-style (output-norm) models with the same
weights and data; a checkpoint written at TP=2 loads at TP=1 and PP=2 with the same loss.

The layouts above load the TP=1 weights through dist_checkpointing, which cuts them with the layers'
own ``sharded_state_dict``: a layer whose forward and sharding agree on a wrong layout would pass.
The ``cut_by_rule`` layouts instead load each TP rank's shards cut from the full TP=1 state dict by
``tp_shards.py``'s rules (megatron's documented layout and the LPA table), strictly, and compare
every gradient with its shard of the TP=1 gradient cut the same way."""

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
    torchrun(
        "distributed/parity_worker.py",
        1,
        "--save-weights",
        root / "weights",
        "--save-grads",
        root / "grads",
        "--save-full",
        root / "full",
        "--loss-file",
        root / "loss.json",
    )
    return root


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_tp1(reference, layout):
    nproc, flags = LAYOUTS[layout]
    torchrun(
        "distributed/parity_worker.py",
        nproc,
        *flags,
        "--load-weights",
        reference / "weights",
        "--check-grads",
        reference / "grads",
        "--loss-file",
        reference / "loss.json",
        "--check-loss",
    )


CUT_BY_RULE_LAYOUTS = {
    "tp2": ["--tp", "2"],
    "tp2_sp": ["--tp", "2", "--sp"],
}


@pytest.mark.parametrize("layout", CUT_BY_RULE_LAYOUTS)
def test_weights_cut_by_rule_load_strictly_and_match_tp1(reference, layout):
    """Every variant at TP=2: the rule-cut TP=1 weights fill the model exactly (strict load, only
    the linear slots' _extra_state not cut), and the loss and every gradient shard are TP=1's."""
    torchrun(
        "distributed/parity_worker.py",
        2,
        *CUT_BY_RULE_LAYOUTS[layout],
        "--load-full",
        reference / "full",
        "--loss-file",
        reference / "loss.json",
        "--check-loss",
    )


def test_checkpoint_saved_at_tp2_loads_at_tp1_and_pp2(reference, tmp_path):
    saved = tmp_path / "tp2_weights"
    variants = "lpa,dense,paper_gpt"
    torchrun(
        "distributed/parity_worker.py",
        2,
        "--tp",
        "2",
        "--variants",
        variants,
        "--load-weights",
        reference / "weights",
        "--save-weights",
        saved,
        "--loss-file",
        reference / "loss.json",
        "--check-loss",
    )
    for nproc, flags in ((1, []), (2, ["--pp", "2"])):
        torchrun(
            "distributed/parity_worker.py",
            nproc,
            *flags,
            "--variants",
            variants,
            "--load-weights",
            saved,
            "--loss-file",
            reference / "loss.json",
            "--check-loss",
        )
