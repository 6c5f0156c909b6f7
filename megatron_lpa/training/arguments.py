"""Command-line flags and YAML files -> one validated ``TrainingConfig``.

Every option is a field of ``TrainingConfig``; its flag is the field name with dashes (Megatron-LM's
names where Megatron-LM has the option). A YAML file given with ``--config`` sets the same fields
(keys with dashes or underscores); flags on the command line override it. ``validate`` then checks
everything that can be checked before any work starts and says what to change.
"""

import argparse
import dataclasses
import difflib
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import yaml


def _opt(default, help: str, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainingConfig:
    """All settings of a pretraining run (see ``pretrain_gpt.py --help``)."""

    # Model shape.
    num_layers: int = _opt(None, "Transformer layers.")
    hidden_size: int = _opt(None, "Model width d.")
    num_attention_heads: int = _opt(None, "Attention heads.")
    num_query_groups: Optional[int] = _opt(None, "Query groups for grouped-query attention "
                                                 "(default: one per head).")
    kv_channels: Optional[int] = _opt(None, "Channels per head (default hidden/heads).")
    ffn_hidden_size: Optional[int] = _opt(None, "FFN width (default 4*hidden).")
    seq_length: int = _opt(None, "Tokens per sample.")
    max_position_embeddings: Optional[int] = _opt(None, "Learned position table size "
                                                        "(default --seq-length).")
    normalization: str = _opt("LayerNorm", "Norm layer.", ("LayerNorm", "RMSNorm"))
    norm_epsilon: float = _opt(1e-5, "Norm epsilon.")
    swiglu: bool = _opt(False, "SwiGLU FFN (LLaMA-style; implies SiLU gating).")
    activation: str = _opt("gelu", "FFN activation without --swiglu.", ("gelu", "relu"))
    position_embedding_type: str = _opt("learned_absolute", "Positions.",
                                        ("learned_absolute", "rope"))
    rotary_base: int = _opt(10000, "RoPE base.")
    disable_bias_linear: bool = _opt(False, "No biases in linear layers (LLaMA-style).")
    untie_embeddings_and_output_weights: bool = _opt(False, "Separate output head.")
    hidden_dropout: float = _opt(0.1, "Dropout after attention and FFN.")
    attention_dropout: float = _opt(0.1, "Dropout on attention probabilities.")
    init_method_std: float = _opt(0.02, "Std of megatron's normal weight init.")
    init_style: str = _opt(
        "megatron", "megatron: megatron-core's init (N(0, --init-method-std), output projections "
                    "scaled by 1/sqrt(2L), zero biases). pytorch: every tensor as PyTorch's "
                    "modules start, as in the paper's code (embeddings N(0,1), dense and low-rank "
                    "linears and their biases U(+-1/sqrt(fan_in)), norms 1/0), the same at every "
                    "TP/PP size.", ("megatron", "pytorch"))
    sublayer_norm: str = _opt(
        "input", "input: pre-norm (each sublayer's input normalised, a final norm; megatron, "
                 "LLaMA). output: each sublayer's output normalised inside its residual branch, "
                 "x + dropout(norm(f(x))), no final norm (the paper's GPT-style block).",
        ("input", "output"))
    output_layer_bias: bool = _opt(False, "A bias on the (untied) output layer, as the paper's head.")
    embedding_dropout: Optional[float] = _opt(
        None, "Dropout on the embeddings (default: --hidden-dropout, as megatron; the paper's "
              "GPT-style setting uses 0).")
    make_vocab_size_divisible_by: int = _opt(128, "Pad the vocabulary to a multiple of this * TP.")
    core_attention: str = _opt("sdpa", "Attention kernel: PyTorch SDPA (flash) or megatron's.",
                               ("sdpa", "local"))
    no_fused_kernels: bool = _opt(
        False, "Run megatron-core's unfused paths (cross-entropy, RoPE, SwiGLU, foreach AdamW, "
               "per-tensor grad norm, weight gradients added to the fp32 buffers in a second "
               "pass) instead of the fused kernels; the baseline for benchmarks.")
    cuda_graph: bool = _opt(
        False, "Capture each step's forward and backward (all micro-batches) in one CUDA graph "
               "after 3 eager steps and replay it (megatron-core's full-iteration graph): no host "
               "launch overhead; evaluation gets its own graph. GPU only; inputs must keep their "
               "shapes.")
    # LPA.
    lpa_attn_rank: int = _opt(0, "Rank r of every attention projection (0 = dense attention).")
    lpa_ffn_rank: int = _opt(0, "Rank of every FFN projection (0 = dense FFN).")
    lpa_init: Optional[str] = _opt(
        None, "LPA factor init: linear (each factor like nn.Linear) or variance (B@A with the "
              "variance of megatron's dense init). Default: variance with --init-style megatron, "
              "linear with pytorch.", ("linear", "variance"))
    # Parallelism.
    tensor_model_parallel_size: int = _opt(1, "Tensor-parallel size.")
    pipeline_model_parallel_size: int = _opt(1, "Pipeline-parallel size.")
    sequence_parallel: bool = _opt(False, "Shard activations along the sequence across TP.")
    use_distributed_optimizer: bool = _opt(False, "Shard optimizer state across data parallel.")
    overlap_grad_reduce: bool = _opt(False, "Overlap the DP gradient reduce with backward.")
    overlap_param_gather: bool = _opt(False, "Overlap the distributed optimizer's param gather.")
    # Precision and memory.
    bf16: bool = _opt(False, "bf16 training (fp32 master weights and grads).")
    fp16: bool = _opt(False, "fp16 training with dynamic loss scaling.")
    recompute_granularity: Optional[str] = _opt(None, "Activation recomputation.",
                                                ("full", "selective"))
    recompute_method: Optional[str] = _opt(None, "With full recomputation.", ("uniform", "block"))
    recompute_num_layers: Optional[int] = _opt(None, "Layers per recomputed chunk.")
    # Batches and length.
    micro_batch_size: int = _opt(1, "Samples per micro-batch per data-parallel rank.")
    global_batch_size: Optional[int] = _opt(None, "Samples per step (default micro * DP); "
                                                  "gradient accumulation makes up the rest.")
    train_iters: Optional[int] = _opt(None, "Training steps.")
    train_samples: Optional[int] = _opt(None, "Training samples (instead of --train-iters).")
    # Optimiser and schedule.
    lr: float = _opt(None, "Peak learning rate.")
    min_lr: float = _opt(0.0, "Final learning rate.")
    lr_decay_style: str = _opt("cosine", "LR decay (wsd: warmup-stable-decay).",
                               ("constant", "linear", "cosine", "wsd"))
    lr_decay_iters: Optional[int] = _opt(None, "Steps of decay (default --train-iters).")
    lr_warmup_iters: int = _opt(0, "Linear warm-up steps.")
    lr_warmup_fraction: Optional[float] = _opt(None, "Warm-up as a fraction of decay steps.")
    lr_wsd_decay_iters: Optional[int] = _opt(None, "WSD: steps of the final decay.")
    lr_wsd_decay_style: str = _opt("exponential", "WSD: shape of the final decay.",
                                   ("exponential", "linear", "cosine"))
    weight_decay: float = _opt(0.01, "AdamW weight decay.")
    adam_beta1: float = _opt(0.9, "Adam beta1.")
    adam_beta2: float = _opt(0.999, "Adam beta2.")
    adam_eps: float = _opt(1e-8, "Adam epsilon.")
    clip_grad: float = _opt(1.0, "Gradient-norm clipping (0 = off).")
    max_nonfinite_steps: int = _opt(5, "Stop after this many steps in a row with a non-finite "
                                       "loss or gradient (each is skipped).")
    # Data.
    data_path: Optional[list] = _opt(None, "Dataset prefix(es), or weight prefix pairs.")
    split: str = _opt("969,30,1", "train,valid,test proportions of --data-path.")
    train_data_path: Optional[list] = _opt(None, "Training datasets (instead of --data-path).")
    valid_data_path: Optional[list] = _opt(None, "Validation datasets.")
    test_data_path: Optional[list] = _opt(None, "Test datasets.")
    data_cache_path: Optional[str] = _opt(None, "Where dataset indices are cached.")
    mock_data: bool = _opt(False, "Random tokens instead of a dataset (benchmarks, smoke tests).")
    num_workers: int = _opt(2, "Data-loader worker processes.")
    tokenizer_type: Optional[str] = _opt(None, "Megatron-LM tokenizer type.")
    tokenizer_model: Optional[str] = _opt(None, "SentencePiece / Hugging Face tokenizer file.")
    vocab_file: Optional[str] = _opt(None, "GPT-2 vocab.json.")
    merge_file: Optional[str] = _opt(None, "GPT-2 merges.txt.")
    vocab_size: Optional[int] = _opt(None, "Vocabulary size for NullTokenizer / --mock-data.")
    reset_position_ids: bool = _opt(False, "Restart positions at each document.")
    reset_attention_mask: bool = _opt(False, "Attend only within documents.")
    eod_mask_loss: bool = _opt(False, "No loss on end-of-document tokens.")
    # Evaluation.
    eval_interval: int = _opt(1000, "Steps between validation runs.")
    eval_iters: int = _opt(100, "Validation steps per run (0 = no evaluation).")
    # Checkpoints.
    save: Optional[str] = _opt(None, "Checkpoint directory to write.")
    load: Optional[str] = _opt(None, "Checkpoint directory to resume from.")
    save_interval: Optional[int] = _opt(None, "Steps between checkpoints.")
    no_load_optim: bool = _opt(False, "Load model weights only (new optimizer and schedule).")
    fallback_to_previous_checkpoint: bool = _opt(
        False, "When the --load checkpoint fails its checksums, load the newest intact earlier one "
               "(the pointer file then names it) instead of stopping.")
    # Logging.
    log_interval: int = _opt(100, "Steps between log lines.")
    tensorboard_dir: Optional[str] = _opt(None, "TensorBoard event directory.")
    log_jsonl: Optional[str] = _opt(None, "Also append every logged record (train, validation, "
                                          "test) as a JSON line to this file, with elapsed time.")
    wandb_project: Optional[str] = _opt(None, "Weights & Biases project (needs wandb).")
    wandb_exp_name: Optional[str] = _opt(None, "Weights & Biases run name.")
    peak_tflops_per_device: Optional[float] = _opt(
        None, "Dense bf16 matmul peak used for MFU (default: 790 on CUDA, the H200's measured "
              "bf16 GEMM rate; MFU is not reported on CPU).")
    # Run control.
    seed: int = _opt(1234, "Random seed.")
    exit_duration_in_mins: Optional[float] = _opt(None, "Save and exit after this wall time.")
    exit_interval: Optional[int] = _opt(None, "Save and exit at a multiple of this step.")
    exit_signal_handler: bool = _opt(False, "On SIGTERM (Slurm's warning), save and exit.")

    # Derived, set by validate().
    data_parallel_size: int = field(default=1, metadata={"derived": True})
    num_microbatches: int = field(default=1, metadata={"derived": True})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _flag(f: dataclasses.Field) -> str:
    return "--" + f.name.replace("_", "-")


def _base_type(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: ...)" only to help that does not already say what the default is."""

    def _get_help_string(self, action):
        if "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Pretrain a GPT (dense or LPA) on megatron-core.",
        formatter_class=_DefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML file with any of these settings; flags override it.")
    for f in dataclasses.fields(TrainingConfig):
        if f.metadata.get("derived"):
            continue
        kind = _base_type(f.type)
        if kind is bool:
            parser.add_argument(_flag(f), dest=f.name, action="store_true", help=f.metadata["help"])
        elif kind is list:
            parser.add_argument(_flag(f), dest=f.name, nargs="+", help=f.metadata["help"])
        else:
            parser.add_argument(_flag(f), dest=f.name, type=kind, choices=f.metadata["choices"],
                                help=f.metadata["help"])
        parser.set_defaults(**{f.name: f.default})
    return parser


def _yaml_flags(path: str) -> list:
    """The YAML file's settings as command-line flags.

    As flags they go through argparse like typed ones (types, choices, one value or a list), and
    the command line, parsed after them, overrides them.
    """
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise SystemExit(f"--config {path}: no such file.")
    except yaml.YAMLError as error:
        raise SystemExit(f"--config {path}: not valid YAML: {error}")
    if not isinstance(loaded, dict):
        raise SystemExit(f"--config {path}: expected a mapping of settings, got {type(loaded).__name__}.")
    root = yaml.compose(Path(path).read_text())
    lines = {node.value: node.start_mark.line + 1 for node, _ in root.value} if root else {}
    return settings_as_flags(loaded, f"--config {path}", lines)


def settings_as_flags(settings: dict, source: str, lines: Optional[dict] = None) -> list:
    """``{"num_layers": 12, "swiglu": True, ...}`` (keys with dashes or underscores) as the flags
    that set them; ``source`` names where the settings came from in error messages, ``lines``
    the line of each key there."""
    fields = {f.name: f for f in dataclasses.fields(TrainingConfig) if not f.metadata.get("derived")}
    flags = []
    for key, value in settings.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            where = f"{source}, line {lines[str(key)]}" if lines and str(key) in lines else source
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f"did you mean {close[0].replace('_', '-')!r}? " if close else ""
            raise SystemExit(f"{where}: unknown setting {key!r}; {hint}"
                             f"see `pretrain_gpt.py --help` for the names.")
        if _base_type(fields[name].type) is bool:
            if not isinstance(value, bool):
                raise SystemExit(f"{source}: {key} must be true or false, got {value!r}.")
            flags += [_flag(fields[name])] if value else []
        elif value is not None:
            values = value if isinstance(value, list) else [value]
            flags += [_flag(fields[name]), *map(str, values)]
    return flags


def parse_args(argv=None) -> TrainingConfig:
    """Flags (and the ``--config`` YAML they name) -> a validated ``TrainingConfig``."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    config_file = parser.parse_known_args(argv)[0].config
    yaml_flags = _yaml_flags(config_file) if config_file else []
    parser.exit_on_error = False  # a bad value in the file is reported with the file's name
    try:
        parser.parse_args(yaml_flags)
    except argparse.ArgumentError as error:
        raise SystemExit(f"--config {config_file}: {error}")
    parser.exit_on_error = True
    namespace = vars(parser.parse_args(yaml_flags + argv))
    namespace.pop("config")
    config = TrainingConfig(**namespace)
    validate(config, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    return config


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"Configuration error: {message}")


def validate(cfg: TrainingConfig, world_size: int) -> None:
    """Checks sizes, ranks, batches and data before any work; fills the derived fields."""
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "lr"):
        _require(getattr(cfg, name) is not None, f"--{name.replace('_', '-')} is required.")
    _require((cfg.train_iters is None) != (cfg.train_samples is None),
             "give exactly one of --train-iters and --train-samples.")
    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    _require(world_size % (tp * pp) == 0,
             f"{world_size} processes cannot be split into TP={tp} x PP={pp}; launch a multiple "
             f"of {tp * pp} processes or change the parallel sizes.")
    cfg.data_parallel_size = world_size // (tp * pp)
    heads = cfg.num_attention_heads
    groups = cfg.num_query_groups or heads
    _require(cfg.kv_channels is not None or cfg.hidden_size % heads == 0,
             f"--hidden-size {cfg.hidden_size} is not divisible by --num-attention-heads {heads}; "
             "change one of them or set --kv-channels.")
    _require(heads % groups == 0,
             f"--num-attention-heads {heads} is not divisible by --num-query-groups {groups}.")
    _require(groups % tp == 0 and heads % tp == 0,
             f"--tensor-model-parallel-size {tp} must divide the attention heads ({heads}) and "
             f"query groups ({groups}); pick a TP size that divides both.")
    ffn = cfg.ffn_hidden_size or 4 * cfg.hidden_size
    _require(ffn % tp == 0, f"--ffn-hidden-size {ffn} is not divisible by TP={tp}.")
    _require(cfg.num_layers % pp == 0,
             f"--num-layers {cfg.num_layers} is not divisible by --pipeline-model-parallel-size {pp}.")
    if cfg.sequence_parallel:
        _require(tp > 1, "--sequence-parallel needs --tensor-model-parallel-size > 1.")
        _require(cfg.seq_length % tp == 0,
                 f"--seq-length {cfg.seq_length} must be divisible by TP={tp} with "
                 "--sequence-parallel.")
    _require(not (cfg.bf16 and cfg.fp16), "choose one of --bf16 and --fp16.")
    _require(not (cfg.init_style == "pytorch" and cfg.lpa_init == "variance"),
             "--lpa-init variance matches megatron's init; --init-style pytorch initialises the "
             "factors like nn.Linear. Drop --lpa-init or use --init-style megatron.")
    if cfg.cuda_graph:
        _require(torch.cuda.is_available(), "--cuda-graph needs a GPU; leave it off on CPU.")
        _require(not cfg.fp16, "--cuda-graph cannot replay fp16's changing loss scale; use --bf16.")
    _require(not cfg.overlap_param_gather or cfg.use_distributed_optimizer,
             "--overlap-param-gather needs --use-distributed-optimizer.")
    _validate_ranks(cfg, heads, groups, ffn)
    # Batches.
    per_step = cfg.micro_batch_size * cfg.data_parallel_size
    if cfg.global_batch_size is None:
        cfg.global_batch_size = per_step
    _require(cfg.global_batch_size % per_step == 0,
             f"--global-batch-size {cfg.global_batch_size} is not a multiple of "
             f"--micro-batch-size {cfg.micro_batch_size} x data-parallel size "
             f"{cfg.data_parallel_size} = {per_step}; use a multiple of {per_step}.")
    cfg.num_microbatches = cfg.global_batch_size // per_step
    if cfg.train_samples is not None:
        cfg.train_iters = math.ceil(cfg.train_samples / cfg.global_batch_size)
        cfg.train_samples = None
    _require(cfg.train_iters > 0, "--train-iters must be positive.")
    _validate_schedule(cfg)
    # Data.
    has_data = cfg.data_path or cfg.train_data_path
    _require(bool(has_data) != cfg.mock_data,
             "give --data-path (or --train-data-path), or --mock-data, but not both.")
    if cfg.mock_data:
        _require(cfg.vocab_size is not None or cfg.tokenizer_type is not None,
                 "--mock-data needs --vocab-size (or a tokenizer).")
    else:
        _require(cfg.tokenizer_type is not None, "--tokenizer-type is required with real data.")
    if cfg.save_interval is not None:
        _require(cfg.save is not None, "--save-interval needs --save DIR.")


def _validate_schedule(cfg: TrainingConfig) -> None:
    """megatron-core's OptimizerParamScheduler asserts warm-up < decay steps after the model is
    built; say it here instead."""
    decay = cfg.lr_decay_iters or cfg.train_iters
    decay_flag = "--lr-decay-iters" if cfg.lr_decay_iters else "--train-iters"
    if cfg.lr_warmup_fraction is not None:
        warmup, warmup_flag = int(cfg.lr_warmup_fraction * decay), "--lr-warmup-fraction"
    else:
        warmup, warmup_flag = cfg.lr_warmup_iters, "--lr-warmup-iters"
    _require(0 <= warmup < decay,
             f"{warmup_flag} gives {warmup} warm-up steps, but the schedule has {decay} steps "
             f"({decay_flag} {decay}); warm up for fewer steps than that, or train longer.")


def _validate_ranks(cfg: TrainingConfig, heads: int, groups: int, ffn: int) -> None:
    """The low-rank layers check ranks too; failing here says so before any process group."""
    head_dim = cfg.kv_channels or cfg.hidden_size // heads
    projections = {
        "--lpa-attn-rank": (cfg.lpa_attn_rank, [(cfg.hidden_size, heads * head_dim),
                                                (cfg.hidden_size, groups * head_dim),
                                                (heads * head_dim, cfg.hidden_size)]),
        "--lpa-ffn-rank": (cfg.lpa_ffn_rank, [(cfg.hidden_size, ffn), (ffn, cfg.hidden_size)]),
    }
    for flag, (rank, shapes) in projections.items():
        _require(rank >= 0, f"{flag} is {rank}; use 0 (dense) or a rank >= 1.")
        if rank == 0:
            continue
        width = min(min(shape) for shape in shapes)
        _require(rank <= width,
                 f"{flag} {rank} exceeds the narrowest projection it replaces ({width} wide); "
                 f"use a rank <= {width}.")
