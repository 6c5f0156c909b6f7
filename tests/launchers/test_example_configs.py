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

from megatron_lpa.config.command_line import parse_args
from megatron_lpa.config.model_config import lpa_config, padded_vocab_size
from megatron_lpa.config.training_config import TrainingConfig
from megatron_lpa.models.builder import build_model
from megatron_lpa.models.flops import matmul_params
from megatron_lpa.models.lpa_config import LPAConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# Our recipes, and the paper's own runs in paper/ (tests/models/test_paper_fidelity.py checks that
# those build the paper code's models).
RECIPES = sorted((EXAMPLES / "configs").glob("*.yaml"))
PAPER_RUNS = sorted((EXAMPLES / "configs" / "paper").glob("*.yaml"))
CONFIGS = RECIPES + PAPER_RUNS
PAPER_CONFIGS = [path for path in RECIPES if path.stem != "tiny_cpu"]
VOCAB = 32000  # the SentencePiece vocabulary the paper-scale configs state
BUILD_LIMIT = 400e6  # parameters; larger models are only counted
SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}
ids = [path.stem for path in CONFIGS]
paper_ids = [path.stem for path in PAPER_RUNS]


def header(path: Path) -> dict:
    """``params`` and ``tokens`` (with the precision they are stated to) and ``layouts``."""
    text = path.read_text()
    stated = {}
    for key in ("params", "tokens"):
        match = re.search(rf"^# {key}:\s+([\d.]+)([KMB]?)\b", text, re.M)
        assert match, f"{path.name}: no '# {key}:' line in the header"
        digits, suffix = match.groups()
        decimals = len(digits.partition(".")[2])
        stated[key] = (float(digits) * SUFFIX[suffix], 0.5 * 10**-decimals * SUFFIX[suffix])
    stated["layouts"] = {
        int(n): flags.split()
        for n, flags in re.findall(r"^# layout\s+(\d+) GPUs:\s*(.+)$", text, re.M)
    }
    return stated


def flat(cfg: TrainingConfig) -> dict:
    """``{setting: value}`` over all sections."""
    return {name: value for section in cfg.to_dict().values() for name, value in section.items()}


def load(
    path: Path, tmp_path: Path, monkeypatch, world_size: int = 1, flags: tuple = ()
) -> TrainingConfig:
    """The config as ``pretrain_gpt.py`` would read it on ``world_size`` processes."""
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    argv = ["--config", str(path), "--save", str(tmp_path), *flags]
    if "mock_data: true" not in path.read_text():
        # Data paths are the user's; the vocabulary is the one the header states.
        argv += ["--mock-data", "--vocab-size", str(VOCAB)]
    return parse_args(argv)


def model_of(cfg: TrainingConfig) -> LPAConfig:
    return dataclasses.replace(
        lpa_config(cfg, padded_vocab_size(cfg.data.vocab_size, cfg)), perform_initialization=False
    )


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
    total += layers * 2 * norm  # two norms per layer
    if config.sublayer_norm == "input":
        total += norm  # the final norm
    if config.add_bias_linear:
        # Dense biases sit on the outputs; a low-rank column slot's on A's r-wide output.
        attn_rank, ffn_rank = config.lpa_attn_rank, config.lpa_ffn_rank
        qkv_bias = 3 * attn_rank if attn_rank else q_width + 2 * kv_width
        fc1_bias = ffn_out // config.ffn_hidden_size * ffn_rank if ffn_rank else ffn_out
        total += layers * (qkv_bias + d + fc1_bias + d)
    if config.output_layer_bias:
        total += vocab
    return total


@pytest.mark.parametrize("path", CONFIGS, ids=ids)
def test_parses_and_states_its_size_and_tokens(path, tmp_path, monkeypatch):
    cfg = load(path, tmp_path, monkeypatch)
    stated = header(path)
    params, tolerance = stated["params"]
    assert analytic_params(model_of(cfg)) == pytest.approx(params, abs=tolerance), path.name
    tokens, tolerance = stated["tokens"]
    assert (
        cfg.schedule.train_iters * cfg.schedule.global_batch_size * cfg.model.seq_length
        == pytest.approx(tokens, abs=tolerance)
    ), path.name
    assert cfg.run.exit_signal_handler, (
        f"{path.name}: Slurm's warning must save (exit_signal_handler)"
    )


@pytest.mark.parametrize("path", PAPER_RUNS, ids=paper_ids)
def test_paper_runs_are_valid_on_the_papers_eight_gpus(path, tmp_path, monkeypatch):
    """The paper trained on 8 GPUs; each stated layout keeps the run and only splits it."""
    reference = flat(load(path, tmp_path, monkeypatch))
    layouts = header(path)["layouts"]
    assert 8 in layouts, f"{path.name}: state the paper's 8-GPU layout"
    for world_size, flags in layouts.items():
        cfg = flat(load(path, tmp_path, monkeypatch, world_size, tuple(flags)))
        changed = {k for k in cfg if cfg[k] != reference[k]}
        assert changed <= {"micro_batch_size", "data_parallel_size", "num_microbatches"}, (
            path.name,
            world_size,
            changed,
        )


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=[p.stem for p in PAPER_CONFIGS])
def test_valid_on_the_stated_gpu_counts(path, tmp_path, monkeypatch):
    """The config as it stands, and with each suggested layout, on 1, 8, 16 and 64 GPUs."""
    reference = flat(load(path, tmp_path, monkeypatch))
    layouts = header(path)["layouts"]
    assert sorted(layouts) == [8, 16, 64], f"{path.name}: state layouts for 8, 16 and 64 GPUs"
    for world_size in (1, 8, 16, 64):
        load(path, tmp_path, monkeypatch, world_size)
    for world_size, flags in layouts.items():
        cfg = flat(load(path, tmp_path, monkeypatch, world_size, tuple(flags)))
        # A layout changes how the work is split, never the run: same batch, schedule and model.
        changed = {k for k in cfg if cfg[k] != reference[k]}
        assert changed <= {
            "micro_batch_size",
            "tensor_model_parallel_size",
            "sequence_parallel",
            "pipeline_model_parallel_size",
            "data_parallel_size",
            "num_microbatches",
        }, (path.name, world_size, changed)


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
    assert built >= 13  # the 130M families, the 370M pairs and the tiny model


def test_paper_shapes():
    """The sizes the issue gives (3.37B dense at 3B) and tests/models/test_param_counts.py's."""
    counts = {path.stem: header(path)["params"][0] for path in PAPER_CONFIGS}
    assert counts["llama_3b_dense"] == pytest.approx(3.37e9, abs=0.005e9)
    for name, millions in (
        ("llama_130m_dense", 134.1),
        ("llama_130m_lpa", 115.3),
        ("gpt_370m_dense", 368.9),
        ("gpt_370m_lpa", 331.1),
    ):
        assert counts[name] == pytest.approx(millions * 1e6, abs=0.1e6), name


@pytest.mark.parametrize(
    "variant,ranks",
    [
        ("llama_130m_lpa", {"lpa_attn_rank": 128}),
        ("llama_130m_lowrank_ffn", {"lpa_ffn_rank": 384}),
        ("llama_130m_lowrank_all", {"lpa_attn_rank": 128, "lpa_ffn_rank": 384}),
        ("gpt_370m_lpa", {"lpa_attn_rank": 320}),
        ("llama_3b_lpa", {"lpa_attn_rank": 768}),
        ("paper/setting2_130m_lpa", {"lpa_attn_rank": 128}),
        ("paper/setting2_130m_lowrank_ffn", {"lpa_ffn_rank": 384}),
        ("paper/setting2_130m_lowrank_all", {"lpa_attn_rank": 128, "lpa_ffn_rank": 384}),
        ("paper/setting1_370m_lpa", {"lpa_attn_rank": 320}),
    ],
)
def test_variants_differ_from_the_dense_baseline_only_in_ranks(
    variant, ranks, tmp_path, monkeypatch
):
    folder, _, name = variant.rpartition("/")
    family = name[: name.rindex("_lowrank") if "_lowrank" in name else name.rindex("_")]
    configs = EXAMPLES / "configs" / folder
    dense = flat(load(configs / f"{family}_dense.yaml", tmp_path, monkeypatch))
    other = flat(load(configs / f"{name}.yaml", tmp_path, monkeypatch))
    assert {k: v for k, v in other.items() if v != dense[k]} == ranks


SHAPE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "ffn_hidden_size",
    "gated_linear_unit",
    "activation_func",
    "normalization",
    "position_embedding_type",
    "max_sequence_length",
    "lpa_attn_rank",
    "lpa_ffn_rank",
)


@pytest.mark.parametrize(
    "recipe,paper", [("llama_130m", "setting2_130m"), ("gpt_370m", "setting1_370m")]
)
def test_our_recipes_share_the_paper_runs_shapes_and_ranks(recipe, paper, tmp_path, monkeypatch):
    """One shape per model size: our megatron-style recipes and the paper's runs cannot drift
    apart (they differ in init, norms, biases and schedule, as their headers say)."""
    configs = EXAMPLES / "configs"
    compared = 0
    for ours in sorted(configs.glob(f"{recipe}_*.yaml")):
        theirs = configs / "paper" / ours.name.replace(recipe, paper)
        ours, theirs = (model_of(load(p, tmp_path, monkeypatch)) for p in (ours, theirs))
        for key in SHAPE_FIELDS:
            assert getattr(ours, key) == getattr(theirs, key), (recipe, key)
        compared += 1
    assert compared == {"llama_130m": 4, "gpt_370m": 2}[recipe]


def test_readme_lists_every_config():
    readme = (EXAMPLES / "README.md").read_text()
    for path in CONFIGS:
        relative = path.relative_to(EXAMPLES).as_posix()
        assert relative in readme, f"examples/README.md does not list {relative}"


@pytest.mark.parametrize("shape", ["130m", "3b", "tiny"])
def test_tool_presets_are_the_configs_models(shape, tmp_path, monkeypatch):
    """The tools' named shapes build exactly the models of the configs they are read from."""
    from megatron_lpa.config import presets

    for variant in presets.variants(shape):
        name = "tiny_cpu" if shape == "tiny" else f"{presets.FAMILIES[shape]}_{variant}"
        from_config = model_of(load(EXAMPLES / "configs" / f"{name}.yaml", tmp_path, monkeypatch))
        monkeypatch.setenv("WORLD_SIZE", "1")
        preset = model_of(
            parse_args(
                presets.model_flags(shape, variant)
                + ["--lr", "1e-3", "--train-iters", "1", "--mock-data", "--vocab-size", str(VOCAB)]
            )
        )
        for key in SHAPE_FIELDS + (
            "layernorm_epsilon",
            "add_bias_linear",
            "share_embeddings_and_output_weights",
        ):
            expected = getattr(from_config, key)
            if shape == "tiny" and variant == "dense" and key == "lpa_attn_rank":
                expected = 0
            assert getattr(preset, key) == expected, (shape, variant, key)
