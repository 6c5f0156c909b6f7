"""The settings tree: every flag belongs to one section, ``--help`` lists them by section, the
checkpoint stores the tree, and ``--load`` refuses another model and reports what else changed."""

import dataclasses
import re
import subprocess
import sys

import pytest

from megatron_lpa.config.command_line import build_parser, parse_args
from megatron_lpa.config.training_config import SECTION_OF, TrainingConfig, setting_names
from megatron_lpa.models.lpa_config import LPAConfig
from tests.training.test_run_control import REPO, TINY, start


def test_every_setting_is_in_exactly_one_section():
    names = [
        name
        for section in dataclasses.fields(TrainingConfig)
        for name in setting_names(section.type)
    ]
    assert len(names) == len(set(names)) == len(SECTION_OF)


def test_help_lists_the_flags_under_their_sections():
    text = build_parser().format_help()
    positions = {
        section.name: text.index(f"\n{section.name}:")
        for section in dataclasses.fields(TrainingConfig)
    }
    assert list(positions) == sorted(positions, key=positions.get)
    assert positions["model"] < text.index("\n  --lpa-attn-rank") < positions["compute"]
    assert positions["parallel"] < text.index("\n  --sequence-parallel") < positions["data"]


def test_config_round_trips_and_reads_the_flat_form_of_older_checkpoints():
    cfg = parse_args(TINY + ["--train-iters", "3", "--tensor-model-parallel-size", "1"])
    assert TrainingConfig.from_dict(cfg.to_dict()) == cfg
    flat = {name: value for section in cfg.to_dict().values() for name, value in section.items()}
    assert TrainingConfig.from_dict(dict(flat, retired_setting=1)) == cfg


def test_a_rank_the_model_refuses_is_refused_by_the_command_line_with_the_same_words():
    """One rule, in the model library: the command line reports the model's own message."""
    with pytest.raises(ValueError) as from_model:
        LPAConfig(
            num_layers=1,
            hidden_size=64,
            num_attention_heads=4,
            lpa_attn_rank=65,
            use_cpu_initialization=True,
        )
    with pytest.raises(SystemExit) as from_flags:
        parse_args(TINY + ["--train-iters", "3", "--lpa-attn-rank", "65"])
    assert str(from_model.value) in str(from_flags.value.code)


def test_load_refuses_another_model_and_reports_what_else_changed(tmp_path):
    save = ["--save", str(tmp_path / "ckpt"), "--save-interval", "2"]
    first, _ = start(tmp_path, "first", "--train-iters", "4", *save)
    assert first.wait(timeout=180) == 0, first.stdout.read()
    resume = ["--load", str(tmp_path / "ckpt"), "--train-iters", "6"]

    other_model = subprocess.run(
        [sys.executable, str(REPO / "pretrain_gpt.py"), *TINY, *resume, "--lpa-attn-rank", "8"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert other_model.returncode == 2, other_model.stdout + other_model.stderr
    assert re.search(
        r"--load \S+ holds another model: --lpa-attn-rank was 16, this run has 8\. "
        r"Resume with the flags",
        other_model.stderr,
    ), other_model.stderr[-2000:]

    changed, _ = start(tmp_path, "changed", *resume, "--hidden-dropout", "0.0")
    output = changed.communicate(timeout=180)[0]
    assert changed.returncode == 0, output
    assert "changed since the checkpoint was saved: --hidden-dropout 0.1 -> 0.0." in output
