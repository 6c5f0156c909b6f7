"""The example configs parse, describe the models and runs their headers state, and pair up.

Each ``examples/configs/*.yaml`` goes through ``parse_args`` (the trainer's own validation) and
states in its header its parameter count (``# params:``), its tokens (``# tokens:``) and the
parallel layouts suggested for 8, 16 and 64 GPUs (``# layout  N GPUs: flags``, which the sbatch
scripts apply).
Parameters are counted analytically (building the 3B model would take ~13 GB); the count is checked
against built models for every config small enough to build.
"""

import dataclasses
import re
from pathlib import Path

import pytest

from megatron_lpa.models.builder import build_model
from megatron_lpa.models.flops import matmul_params
from megatron_lpa.models.lpa_config import LPAConfig
from megatron_lpa.training.arguments import TrainingConfig, parse_args
from megatron_lpa.training.trainer import model_config, padded_vocab_size

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CONFIGS = sorted((EXAMPLES / "configs").glob("*.yaml"))
PAPER_CONFIGS = [path for path in CONFIGS if path.stem != "tiny_cpu"]
VOCAB = 32000  # the SentencePiece vocabulary the paper-scale configs state
BUILD_LIMIT = 400e6  # parameters; larger models are only counted
SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}
ids = [path.stem for path in CONFIGS]


def header(path: Path) -> dict:
    """``params`` and ``tokens`` (with the precision they are stated to) and ``layouts``."""
    text = path.read_text()
    stated = {}
    for key in ("params", "tokens"):
        match = re.search(rf"^# {key}:\s+([\d.]+)([KMB]?)\b", text, re.M)
        assert match, f"{path.name}: no '# {key}:' line in the header"
        digits, suffix = match.groups()
        decimals = len(digits.partition(".")[2])
        stated[key] = (float(digits) * SUFFIX[suffix], 0.5 * 10 ** -decimals * SUFFIX[suffix])
    stated["layouts"] = {int(n): flags.split() for n, flags in
                         re.findall(r"^# layout\s+(\d+) GPUs:\s*(.+)$", text, re.M)}
    return stated


def load(path: Path, tmp_path: Path, monkeypatch, world_size: int = 1,
         flags: tuple = ()) -> TrainingConfig:
    """The config as ``pretrain_gpt.py`` would read it on ``world_size`` processes."""
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    argv = ["--config", str(path), "--save", str(tmp_path), *flags]
    if "mock_data: true" not in path.read_text():
        # Data paths are the user's; the vocabulary is the one the header states.
        argv += ["--mock-data", "--vocab-size", str(VOCAB)]
    return parse_args(argv)


def model_of(cfg: TrainingConfig) -> LPAConfig:
    return dataclasses.replace(model_config(cfg, padded_vocab_size(cfg.vocab_size, cfg)),
                               perform_initialization=False)


def analytic_params(config: LPAConfig) -> int:
    """Every parameter of ``build_model(config)`` at TP=PP=1, from the shapes alone."""
    d, layers, vocab = config.hidden_size, config.num_layers, config.vocab_size
    q_width = config.num_attention_heads * config.kv_channels
    kv_width = (config.num_query_groups or config.num_attention_heads) * config.kv_channels
    ffn_out = config.ffn_hidden_size * (2 if config.gated_linear_unit else 1)
    norm = 2 * d if config.normalization == "LayerNorm" else d  # weight (+ bias)
    total = matmul_params(config)  # every linear layer's weights and the output head
    if config.share_embeddings_and_output_weights:
        total -= vocab * d
    total += vocab * d  # word embeddings
    if config.position_embedding_type == "learned_absolute":
        total += config.max_sequence_length * d
    total += layers * 2 * norm + norm  # two norms per layer, the final norm
    if config.add_bias_linear:  # biases sit on the outputs, dense or factored alike
        total += layers * (q_width + 2 * kv_width + d + ffn_out + d)
    return total


@pytest.mark.parametrize("path", CONFIGS, ids=ids)
def test_parses_and_states_its_size_and_tokens(path, tmp_path, monkeypatch):
    cfg = load(path, tmp_path, monkeypatch)
    stated = header(path)
    params, tolerance = stated["params"]
    assert analytic_params(model_of(cfg)) == pytest.approx(params, abs=tolerance), path.name
    tokens, tolerance = stated["tokens"]
    assert cfg.train_iters * cfg.global_batch_size * cfg.seq_length == pytest.approx(
        tokens, abs=tolerance), path.name
    assert cfg.exit_signal_handler, f"{path.name}: Slurm's warning must save (exit_signal_handler)"


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=[p.stem for p in PAPER_CONFIGS])
def test_valid_on_the_stated_gpu_counts(path, tmp_path, monkeypatch):
    """The config as it stands, and with each suggested layout, on 1, 8, 16 and 64 GPUs."""
    reference = dataclasses.asdict(load(path, tmp_path, monkeypatch))
    layouts = header(path)["layouts"]
    assert sorted(layouts) == [8, 16, 64], f"{path.name}: state layouts for 8, 16 and 64 GPUs"
    for world_size in (1, 8, 16, 64):
        load(path, tmp_path, monkeypatch, world_size)
    for world_size, flags in layouts.items():
        cfg = dataclasses.asdict(load(path, tmp_path, monkeypatch, world_size, tuple(flags)))
        # A layout changes how the work is split, never the run: same batch, schedule and model.
        changed = {k for k in cfg if cfg[k] != reference[k]}
        assert changed <= {"micro_batch_size", "tensor_model_parallel_size", "sequence_parallel",
                           "pipeline_model_parallel_size", "data_parallel_size",
                           "num_microbatches"}, (path.name, world_size, changed)


def test_analytic_count_matches_built_models(model_parallel, tmp_path, monkeypatch):
    built = 0
    for path in CONFIGS:
        config = model_of(load(path, tmp_path, monkeypatch))
        expected = analytic_params(config)
        if expected > BUILD_LIMIT:
            continue
        model = build_model(config)
        assert sum(p.numel() for p in model.parameters()) == expected, path.name
        del model
        built += 1
    assert built >= 7  # the 130M family, the 370M pair and the tiny model


def test_paper_shapes():
    """The sizes the issue gives (3.37B dense at 3B) and tests/models/test_param_counts.py's."""
    counts = {path.stem: header(path)["params"][0] for path in PAPER_CONFIGS}
    assert counts["llama_3b_dense"] == pytest.approx(3.37e9, abs=0.005e9)
    for name, millions in (("llama_130m_dense", 134.1), ("llama_130m_lpa", 115.3),
                           ("gpt_370m_dense", 368.9), ("gpt_370m_lpa", 331.1)):
        assert counts[name] == pytest.approx(millions * 1e6, abs=0.1e6), name


@pytest.mark.parametrize("variant,ranks", [
    ("llama_130m_lpa", {"lpa_attn_rank": 128}),
    ("llama_130m_lowrank_ffn", {"lpa_ffn_rank": 128}),
    ("llama_130m_lowrank_all", {"lpa_attn_rank": 128, "lpa_ffn_rank": 128}),
    ("gpt_370m_lpa", {"lpa_attn_rank": 320}),
    ("llama_3b_lpa", {"lpa_attn_rank": 768}),
])
def test_variants_differ_from_the_dense_baseline_only_in_ranks(variant, ranks, tmp_path,
                                                               monkeypatch):
    family = "_".join(variant.split("_")[:2])  # llama_130m, gpt_370m, llama_3b
    dense = dataclasses.asdict(load(EXAMPLES / "configs" / f"{family}_dense.yaml", tmp_path,
                                    monkeypatch))
    other = dataclasses.asdict(load(EXAMPLES / "configs" / f"{variant}.yaml", tmp_path,
                                    monkeypatch))
    assert {k: v for k, v in other.items() if v != dense[k]} == ranks


def test_readme_lists_every_config():
    readme = (EXAMPLES / "README.md").read_text()
    for path in CONFIGS:
        assert f"configs/{path.name}" in readme, f"examples/README.md does not list {path.name}"
