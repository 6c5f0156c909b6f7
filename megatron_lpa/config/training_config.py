"""The settings of a pretraining run: one tree of small sections, each checking its own rules.

``TrainingConfig`` holds ten sections (model, compute, parallel, data, schedule, optimizer,
evaluation, checkpoint, logging, run). Every setting is a field of exactly one section; its
command-line flag is the field name with dashes (Megatron-LM's names where Megatron-LM has the
option), so flags and YAML keys stay flat while the code reads ``cfg.model.hidden_size``.
``TrainingConfig.validate`` checks each section once, in an order where every rule can use what
the sections before it have derived (the data-parallel size, the number of micro-batches), and
says which flag to change. The rules the model library enforces as well (LPA ranks, initialisation,
query groups under TP) are the model library's functions, called here with the run's values.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_lpa.layers.low_rank_linear import LPA_INIT_METHODS
from megatron_lpa.models import lpa_config


class ConfigError(SystemExit):
    """A setting that cannot work; the message names the flag and what to change."""

    def __init__(self, message: str):
        super().__init__(f"Configuration error: {message}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _model_rule(check, *args) -> None:
    """Runs one of the model library's checks, reporting its ValueError as a configuration error."""
    try:
        check(*args)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def setting(default, help: str, choices=None):
    """A field that is a command-line flag (``--field-name``) and a YAML key."""
    return field(default=default, metadata={"help": help, "choices": choices})


def derived(default):
    """A field ``validate`` fills from the others; not a flag."""
    return field(default=default, metadata={"derived": True})


@dataclass
class ModelSection:
    """The architecture (shapes, norms, positions, dropout, initialisation) and the LPA ranks."""

    num_layers: int = setting(None, "Transformer layers.")
    hidden_size: int = setting(None, "Model width d.")
    num_attention_heads: int = setting(None, "Attention heads.")
    num_query_groups: Optional[int] = setting(
        None, "Query groups for grouped-query attention (default: one per head)."
    )
    kv_channels: Optional[int] = setting(None, "Channels per head (default hidden/heads).")
    ffn_hidden_size: Optional[int] = setting(None, "FFN width (default 4*hidden).")
    seq_length: int = setting(None, "Tokens per sample.")
    max_position_embeddings: Optional[int] = setting(
        None, "Learned position table size (default --seq-length)."
    )
    normalization: str = setting("LayerNorm", "Norm layer.", ("LayerNorm", "RMSNorm"))
    norm_epsilon: float = setting(1e-5, "Norm epsilon.")
    swiglu: bool = setting(False, "SwiGLU FFN (LLaMA-style; implies SiLU gating).")
    activation: str = setting("gelu", "FFN activation without --swiglu.", ("gelu", "relu"))
    position_embedding_type: str = setting(
        "learned_absolute", "Positions.", lpa_config.POSITION_EMBEDDINGS
    )
    rotary_base: int = setting(10000, "RoPE base.")
    disable_bias_linear: bool = setting(False, "No biases in linear layers (LLaMA-style).")
    untie_embeddings_and_output_weights: bool = setting(False, "Separate output head.")
    hidden_dropout: float = setting(0.1, "Dropout after attention and FFN.")
    attention_dropout: float = setting(0.1, "Dropout on attention probabilities.")
    embedding_dropout: Optional[float] = setting(
        None,
        "Dropout on the embeddings (default: --hidden-dropout, as megatron; the paper's "
        "GPT-style setting uses 0).",
    )
    init_method_std: float = setting(0.02, "Std of megatron's normal weight init.")
    init_style: str = setting(
        "megatron",
        "megatron: megatron-core's init (N(0, --init-method-std), output projections "
        "scaled by 1/sqrt(2L), zero biases). pytorch: every tensor as PyTorch's "
        "modules start, as in the paper's code (embeddings N(0,1), dense and low-rank "
        "linears and their biases U(+-1/sqrt(fan_in)), norms 1/0), the same at every "
        "TP/PP size.",
        lpa_config.INIT_STYLES,
    )
    sublayer_norm: str = setting(
        "input",
        "input: pre-norm (each sublayer's input normalised, a final norm; megatron, "
        "LLaMA). output: each sublayer's output normalised inside its residual branch, "
        "x + dropout(norm(f(x))), no final norm (the paper's GPT-style block).",
        lpa_config.SUBLAYER_NORMS,
    )
    output_layer_bias: bool = setting(
        False, "A bias on the (untied) output layer, as the paper's head."
    )
    make_vocab_size_divisible_by: int = setting(
        128, "Pad the vocabulary to a multiple of this * TP."
    )
    lpa_attn_rank: int = setting(0, "Rank r of every attention projection (0 = dense attention).")
    lpa_ffn_rank: int = setting(0, "Rank of every FFN projection (0 = dense FFN).")
    lpa_init: Optional[str] = setting(
        None,
        "LPA factor init: linear (each factor like nn.Linear) or variance (B@A with the "
        "variance of megatron's dense init). Default: variance with --init-style megatron, "
        "linear with pytorch.",
        LPA_INIT_METHODS,
    )

    # Settings that only say how the weights start: a resumed run may change them.
    INIT_ONLY = (
        "hidden_dropout",
        "attention_dropout",
        "embedding_dropout",
        "init_method_std",
        "init_style",
        "lpa_init",
    )

    @property
    def heads(self) -> tuple:
        """(attention heads, query groups, channels per head)."""
        heads = self.num_attention_heads
        return (
            heads,
            self.num_query_groups or heads,
            self.kv_channels or self.hidden_size // heads,
        )

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
            _require(getattr(self, name) is not None, f"--{name.replace('_', '-')} is required.")
        heads = self.num_attention_heads
        _require(
            self.kv_channels is not None or self.hidden_size % heads == 0,
            f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
            f"{heads}; change one of them or set --kv-channels.",
        )
        heads, groups, head_dim = self.heads
        _require(
            heads % groups == 0,
            f"--num-attention-heads {heads} is not divisible by --num-query-groups {groups}.",
        )
        _model_rule(lpa_config.resolve_lpa_init, self.init_style, self.lpa_init)
        _model_rule(
            lpa_config.check_ranks,
            self.lpa_attn_rank,
            self.lpa_ffn_rank,
            self.hidden_size,
            heads,
            groups,
            head_dim,
            self.ffn_size,
        )


@dataclass
class ComputeSection:
    """How the model computes: precision, attention kernel, fused kernels, recomputation."""

    bf16: bool = setting(False, "bf16 training (fp32 master weights and grads).")
    fp16: bool = setting(False, "fp16 training with dynamic loss scaling.")
    core_attention: str = setting(
        "sdpa", "Attention kernel: PyTorch SDPA (flash) or megatron's.", lpa_config.CORE_ATTENTION
    )
    no_fused_kernels: bool = setting(
        False,
        "Run megatron-core's unfused paths (cross-entropy, RoPE, SwiGLU, foreach AdamW, "
        "per-tensor grad norm, weight gradients added to the fp32 buffers in a second "
        "pass) instead of the fused kernels; the baseline for benchmarks.",
    )
    cuda_graph: bool = setting(
        False,
        "Capture each step's forward and backward (all micro-batches) in one CUDA graph "
        "after 3 eager steps and replay it (megatron-core's full-iteration graph): no host "
        "launch overhead; evaluation gets its own graph. GPU only; inputs must keep their "
        "shapes.",
    )
    recompute_granularity: Optional[str] = setting(
        None, "Activation recomputation.", ("full", "selective")
    )
    recompute_method: Optional[str] = setting(
        None, "With full recomputation.", ("uniform", "block")
    )
    recompute_num_layers: Optional[int] = setting(None, "Layers per recomputed chunk.")

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32

    def validate(self) -> None:
        _require(not (self.bf16 and self.fp16), "choose one of --bf16 and --fp16.")
        if self.cuda_graph:
            _require(torch.cuda.is_available(), "--cuda-graph needs a GPU; leave it off on CPU.")
            _require(
                not self.fp16, "--cuda-graph cannot replay fp16's changing loss scale; use --bf16."
            )


@dataclass
class ParallelSection:
    """How the ranks split the work (data parallel is what TP x PP leaves)."""

    tensor_model_parallel_size: int = setting(1, "Tensor-parallel size.")
    pipeline_model_parallel_size: int = setting(1, "Pipeline-parallel size.")
    sequence_parallel: bool = setting(False, "Shard activations along the sequence across TP.")
    use_distributed_optimizer: bool = setting(False, "Shard optimizer state across data parallel.")
    overlap_grad_reduce: bool = setting(False, "Overlap the DP gradient reduce with backward.")
    overlap_param_gather: bool = setting(False, "Overlap the distributed optimizer's param gather.")
    data_parallel_size: int = derived(1)

    def validate(self, model: ModelSection, world_size: int) -> None:
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        _require(
            world_size % (tp * pp) == 0,
            f"{world_size} processes cannot be split into TP={tp} x PP={pp}; launch a "
            f"multiple of {tp * pp} processes or change the parallel sizes.",
        )
        self.data_parallel_size = world_size // (tp * pp)
        heads, groups, _ = model.heads
        if model.lpa_attn_rank > 0:
            _model_rule(lpa_config.check_attention_split, groups, tp)
        # Stricter than megatron-core for dense models too: every layout of a shape is one that
        # its LPA variant can take.
        _require(
            groups % tp == 0 and heads % tp == 0,
            f"--tensor-model-parallel-size {tp} must divide the attention heads ({heads}) "
            f"and query groups ({groups}); pick a TP size that divides both.",
        )
        _require(
            model.ffn_size % tp == 0,
            f"--ffn-hidden-size {model.ffn_size} is not divisible by TP={tp}.",
        )
        _require(
            model.num_layers % pp == 0,
            f"--num-layers {model.num_layers} is not divisible by "
            f"--pipeline-model-parallel-size {pp}.",
        )
        if self.sequence_parallel:
            _require(tp > 1, "--sequence-parallel needs --tensor-model-parallel-size > 1.")
            _require(
                model.seq_length % tp == 0,
                f"--seq-length {model.seq_length} must be divisible by TP={tp} with "
                "--sequence-parallel.",
            )
        _require(
            not self.overlap_param_gather or self.use_distributed_optimizer,
            "--overlap-param-gather needs --use-distributed-optimizer.",
        )


@dataclass
class DataSection:
    """Where the tokens come from and how samples are masked."""

    data_path: Optional[list] = setting(None, "Dataset prefix(es), or weight prefix pairs.")
    split: str = setting("969,30,1", "train,valid,test proportions of --data-path.")
    train_data_path: Optional[list] = setting(None, "Training datasets (instead of --data-path).")
    valid_data_path: Optional[list] = setting(None, "Validation datasets.")
    test_data_path: Optional[list] = setting(None, "Test datasets.")
    data_cache_path: Optional[str] = setting(None, "Where dataset indices are cached.")
    mock_data: bool = setting(
        False, "Random tokens instead of a dataset (benchmarks, smoke tests)."
    )
    num_workers: int = setting(2, "Data-loader worker processes.")
    tokenizer_type: Optional[str] = setting(None, "Megatron-LM tokenizer type.")
    tokenizer_model: Optional[str] = setting(None, "SentencePiece / Hugging Face tokenizer file.")
    vocab_file: Optional[str] = setting(None, "GPT-2 vocab.json.")
    merge_file: Optional[str] = setting(None, "GPT-2 merges.txt.")
    vocab_size: Optional[int] = setting(None, "Vocabulary size for NullTokenizer / --mock-data.")
    reset_position_ids: bool = setting(False, "Restart positions at each document.")
    reset_attention_mask: bool = setting(False, "Attend only within documents.")
    eod_mask_loss: bool = setting(False, "No loss on end-of-document tokens.")

    def validate(self) -> None:
        _require(
            bool(self.data_path or self.train_data_path) != self.mock_data,
            "give --data-path (or --train-data-path), or --mock-data, but not both.",
        )
        if self.mock_data:
            _require(
                self.vocab_size is not None or self.tokenizer_type is not None,
                "--mock-data needs --vocab-size (or a tokenizer).",
            )
        else:
            _require(
                self.tokenizer_type is not None, "--tokenizer-type is required with real data."
            )


@dataclass
class ScheduleSection:
    """How long to train, in what batches, at what learning rate."""

    micro_batch_size: int = setting(1, "Samples per micro-batch per data-parallel rank.")
    global_batch_size: Optional[int] = setting(
        None, "Samples per step (default micro * DP); gradient accumulation makes up the rest."
    )
    train_iters: Optional[int] = setting(None, "Training steps.")
    train_samples: Optional[int] = setting(None, "Training samples (instead of --train-iters).")
    lr: float = setting(None, "Peak learning rate.")
    min_lr: float = setting(0.0, "Final learning rate.")
    lr_decay_style: str = setting(
        "cosine", "LR decay (wsd: warmup-stable-decay).", ("constant", "linear", "cosine", "wsd")
    )
    lr_decay_iters: Optional[int] = setting(None, "Steps of decay (default --train-iters).")
    lr_warmup_iters: int = setting(0, "Linear warm-up steps.")
    lr_warmup_fraction: Optional[float] = setting(None, "Warm-up as a fraction of decay steps.")
    lr_wsd_decay_iters: Optional[int] = setting(None, "WSD: steps of the final decay.")
    lr_wsd_decay_style: str = setting(
        "exponential", "WSD: shape of the final decay.", ("exponential", "linear", "cosine")
    )
    num_microbatches: int = derived(1)

    @property
    def decay_steps(self) -> int:
        return self.lr_decay_iters or self.train_iters

    @property
    def warmup_steps(self) -> int:
        if self.lr_warmup_fraction is not None:
            return int(self.lr_warmup_fraction * self.decay_steps)
        return self.lr_warmup_iters

    def validate(self, parallel: ParallelSection) -> None:
        _require(self.lr is not None, "--lr is required.")
        _require(
            (self.train_iters is None) != (self.train_samples is None),
            "give exactly one of --train-iters and --train-samples.",
        )
        dp = parallel.data_parallel_size
        per_step = self.micro_batch_size * dp
        if self.global_batch_size is None:
            self.global_batch_size = per_step
        _require(
            self.global_batch_size % per_step == 0,
            f"--global-batch-size {self.global_batch_size} is not a multiple of "
            f"--micro-batch-size {self.micro_batch_size} x data-parallel size {dp} = "
            f"{per_step}; use a multiple of {per_step}.",
        )
        self.num_microbatches = self.global_batch_size // per_step
        if self.train_samples is not None:
            self.train_iters = math.ceil(self.train_samples / self.global_batch_size)
            self.train_samples = None
        _require(self.train_iters > 0, "--train-iters must be positive.")
        # megatron-core's OptimizerParamScheduler asserts this only after the model is built.
        decay_flag = "--lr-decay-iters" if self.lr_decay_iters else "--train-iters"
        warmup_flag = (
            "--lr-warmup-fraction" if self.lr_warmup_fraction is not None else "--lr-warmup-iters"
        )
        _require(
            0 <= self.warmup_steps < self.decay_steps,
            f"{warmup_flag} gives {self.warmup_steps} warm-up steps, but the schedule has "
            f"{self.decay_steps} steps ({decay_flag} {self.decay_steps}); warm up for fewer "
            "steps than that, or train longer.",
        )


@dataclass
class OptimizerSection:
    """AdamW and what a step does with bad gradients."""

    weight_decay: float = setting(0.01, "AdamW weight decay.")
    adam_beta1: float = setting(0.9, "Adam beta1.")
    adam_beta2: float = setting(0.999, "Adam beta2.")
    adam_eps: float = setting(1e-8, "Adam epsilon.")
    clip_grad: float = setting(1.0, "Gradient-norm clipping (0 = off).")
    max_nonfinite_steps: int = setting(
        5,
        "Stop after this many steps in a row with a non-finite loss or gradient (each is skipped).",
    )


@dataclass
class EvaluationSection:
    eval_interval: int = setting(1000, "Steps between validation runs.")
    eval_iters: int = setting(100, "Validation steps per run (0 = no evaluation).")


@dataclass
class CheckpointSection:
    save: Optional[str] = setting(None, "Checkpoint directory to write.")
    load: Optional[str] = setting(None, "Checkpoint directory to resume from.")
    save_interval: Optional[int] = setting(None, "Steps between checkpoints.")
    no_load_optim: bool = setting(False, "Load model weights only (new optimizer and schedule).")
    fallback_to_previous_checkpoint: bool = setting(
        False,
        "When the --load checkpoint fails its checksums, load the newest intact earlier one "
        "(the pointer file then names it) instead of stopping.",
    )

    def validate(self) -> None:
        if self.save_interval is not None:
            _require(self.save is not None, "--save-interval needs --save DIR.")


@dataclass
class LoggingSection:
    log_interval: int = setting(100, "Steps between log lines.")
    tensorboard_dir: Optional[str] = setting(None, "TensorBoard event directory.")
    log_jsonl: Optional[str] = setting(
        None,
        "Also append every logged record (train, validation, test) as a JSON line to this "
        "file, with elapsed time.",
    )
    wandb_project: Optional[str] = setting(None, "Weights & Biases project (needs wandb).")
    wandb_exp_name: Optional[str] = setting(None, "Weights & Biases run name.")
    peak_tflops_per_device: Optional[float] = setting(
        None,
        "Dense bf16 matmul peak used for MFU (default: 790 on CUDA, the H200's measured "
        "bf16 GEMM rate; MFU is not reported on CPU).",
    )


@dataclass
class RunSection:
    """Seed and when to stop early."""

    seed: int = setting(1234, "Random seed (weights, dropout, data order).")
    exit_duration_in_mins: Optional[float] = setting(None, "Save and exit after this wall time.")
    exit_interval: Optional[int] = setting(None, "Save and exit at a multiple of this step.")
    exit_signal_handler: bool = setting(False, "On SIGTERM (Slurm's warning), save and exit.")


@dataclass
class TrainingConfig:
    """All settings of a pretraining run (see ``pretrain_gpt.py --help``)."""

    model: ModelSection = field(default_factory=ModelSection)
    compute: ComputeSection = field(default_factory=ComputeSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataSection = field(default_factory=DataSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    run: RunSection = field(default_factory=RunSection)

    def validate(self, world_size: int) -> "TrainingConfig":
        """Checks everything that can be checked before any work; fills the derived fields."""
        self.model.validate()
        self.compute.validate()
        self.parallel.validate(self.model, world_size)
        self.schedule.validate(self.parallel)
        self.data.validate()
        self.checkpoint.validate()
        return self

    def to_dict(self) -> dict:
        """``{section: {setting: value}}``, as the checkpoint stores it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainingConfig":
        """The config ``to_dict`` wrote; also reads the flat ``{setting: value}`` form of
        checkpoints saved before the sections existed. Settings this version lacks are dropped."""
        flat = (
            saved
            if not all(isinstance(v, dict) for v in saved.values())
            else {name: value for section in saved.values() for name, value in section.items()}
        )
        return cls(
            **{
                section.name: section.type(
                    **{name: flat[name] for name in setting_names(section.type) if name in flat}
                )
                for section in dataclasses.fields(cls)
            }
        )

    def replace(self, **settings) -> "TrainingConfig":
        """A copy with some settings changed, named flat (``tensor_model_parallel_size=2``)."""
        copy = TrainingConfig.from_dict(self.to_dict())
        for name, value in settings.items():
            setattr(getattr(copy, SECTION_OF[name]), name, value)
        return copy


def setting_names(section_type, with_derived: bool = True) -> list:
    return [
        f.name
        for f in dataclasses.fields(section_type)
        if with_derived or not f.metadata.get("derived")
    ]


SECTION_OF = {
    name: section.name
    for section in dataclasses.fields(TrainingConfig)
    for name in setting_names(section.type)
}
"""Which section each setting belongs to."""


def differences(saved: TrainingConfig, current: TrainingConfig, section: str) -> dict:
    """``{setting: (saved value, current value)}`` of one section, derived fields left out."""
    old, new = getattr(saved, section), getattr(current, section)
    return {
        name: (getattr(old, name), getattr(new, name))
        for name in setting_names(type(new), with_derived=False)
        if getattr(old, name) != getattr(new, name)
    }
