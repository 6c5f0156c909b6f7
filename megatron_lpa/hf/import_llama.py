"""A dense ``LlamaForCausalLM`` directory as one of our checkpoints, optionally with LPA factors.

``import_llama`` reads ``config.json`` and the safetensors weights, maps the config onto
``pretrain_gpt.py`` flags (``llama_flags``), factors each projection by truncated SVD where an LPA
rank is given (``state_dict.factorize``), and saves a model-only checkpoint (iteration 0, no
optimizer) with the run config those flags give, so that ``pretrain_gpt.py --load DIR
--no-load-optim`` plus the same flags trains on from it, at the chosen TP/PP size or any other.
"""

import dataclasses
import json
from pathlib import Path

import torch

from megatron_lpa.checkpointing.checkpoint import save_checkpoint
from megatron_lpa.config.command_line import parse_args
from megatron_lpa.config.model_config import lpa_config, padded_vocab_size
from megatron_lpa.hf.state_dict import factorize_projections, from_hf
from megatron_lpa.models.builder import build_model
from megatron_lpa.platform.distributed import destroy_distributed, initialize_distributed
from megatron_lpa.tokenizers import build_tokenizer


class LlamaImportError(ValueError):
    """A Hugging Face directory this import cannot turn into one of our models."""


def read_weights(directory: Path) -> dict:
    """Every tensor of ``model.safetensors`` or the shards its index names."""
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise LlamaImportError(
            f"{directory} has no model.safetensors (or its index); save the model "
            "with safe_serialization (transformers' default) first."
        )
    state = {}
    for name in files:
        state.update(load_file(str(directory / name)))
    return state


def tokenizer_flags(directory: Path) -> list:
    """Our tokenizer flags for the directory's tokenizer: ``tokenizer.json`` (Hugging Face) or
    ``tokenizer.model`` (SentencePiece); none without either."""
    if (directory / "tokenizer.json").is_file():
        return [
            "--tokenizer-type",
            "HuggingFaceTokenizer",
            "--tokenizer-model",
            str(directory.resolve()),
        ]
    if (directory / "tokenizer.model").is_file():
        return [
            "--tokenizer-type",
            "GPTSentencePieceTokenizer",
            "--tokenizer-model",
            str((directory / "tokenizer.model").resolve()),
        ]
    return []


def llama_flags(config: dict, seq_length: int, attn_rank: int, ffn_rank: int) -> list:
    """``pretrain_gpt.py`` flags of the model ``config`` (a Llama ``config.json``) describes."""
    problems = []
    if config.get("model_type") != "llama":
        problems.append(f"model_type {config.get('model_type')!r} (only 'llama' is read)")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config['hidden_act']!r} (SwiGLU needs silu)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r}")
    if config.get("attention_bias", False) != config.get("mlp_bias", False):
        problems.append(
            "biases in attention but not the MLP or the other way round (our "
            "linears have biases everywhere or nowhere)"
        )
    biased = config.get("attention_bias", False)
    if biased and (attn_rank or ffn_rank):
        problems.append(
            "biased projections with an LPA rank (a low-rank input projection's "
            "bias is r wide and cannot hold the dense one)"
        )
    if problems:
        raise LlamaImportError("cannot import " + "; ".join(problems) + ".")
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    groups = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    flags = [
        "--num-layers",
        config["num_hidden_layers"],
        "--hidden-size",
        hidden,
        "--num-attention-heads",
        heads,
        "--ffn-hidden-size",
        config["intermediate_size"],
        "--seq-length",
        seq_length,
        "--max-position-embeddings",
        config.get("max_position_embeddings", seq_length),
        "--normalization",
        "RMSNorm",
        "--norm-epsilon",
        config.get("rms_norm_eps", 1e-6),
        "--swiglu",
        "--position-embedding-type",
        "rope",
        "--rotary-base",
        int(theta),
        "--hidden-dropout",
        0,
        "--attention-dropout",
        0,
    ]
    if groups != heads:
        flags += ["--num-query-groups", groups]
    if head_dim * heads != hidden:
        flags += ["--kv-channels", head_dim]
    if not biased:
        flags.append("--disable-bias-linear")
    if not config.get("tie_word_embeddings", False):
        flags.append("--untie-embeddings-and-output-weights")
    if attn_rank:
        flags += ["--lpa-attn-rank", attn_rank]
    if ffn_rank:
        flags += ["--lpa-ffn-rank", ffn_rank]
    return [str(flag) for flag in flags]


def import_llama(
    directory: str,
    save: str,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    attn_rank: int = 0,
    ffn_rank: int = 0,
    seq_length: int = 0,
) -> list:
    """Writes ``directory``'s Llama as our checkpoint in ``save``; returns the model flags.

    The checkpoint is written by this one process; it loads at the chosen TP/PP size (whose
    vocabulary padding it has) and at any other that divides its rows.
    """
    source = Path(directory)
    config = json.loads((source / "config.json").read_text())
    seq_length = seq_length or config.get("max_position_embeddings", 2048)
    flags = llama_flags(config, seq_length, attn_rank, ffn_rank) + tokenizer_flags(source)
    layout = [
        "--tensor-model-parallel-size",
        str(tensor_model_parallel_size),
        "--pipeline-model-parallel-size",
        str(pipeline_model_parallel_size),
    ]
    # What the checkpoint's stored run config needs to validate; a training run gives its own.
    placeholders = [
        "--mock-data",
        "--vocab-size",
        str(config["vocab_size"]),
        "--lr",
        "0",
        "--train-iters",
        "1",
    ]
    try:
        cfg = parse_args(
            flags + layout + placeholders,
            world_size=tensor_model_parallel_size * pipeline_model_parallel_size,
        )
    except SystemExit as error:
        raise LlamaImportError(str(error)) from None
    rows = padded_vocab_size(config["vocab_size"], cfg)
    if cfg.data.tokenizer_type:
        tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
        if padded_vocab_size(tokenizer.vocab_size, cfg) != rows:
            raise LlamaImportError(
                f"the tokenizer has {tokenizer.vocab_size} ids but the model "
                f"{config['vocab_size']} rows, which pad to different sizes "
                f"({padded_vocab_size(tokenizer.vocab_size, cfg)}"
                f" vs {rows}); training with this tokenizer could not load the checkpoint."
            )
    state = read_weights(source)
    if attn_rank or ffn_rank:
        state = factorize_projections(state, attn_rank, ffn_rank)
    initialize_distributed()
    try:
        one_process = cfg.replace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
        model_cfg = dataclasses.replace(lpa_config(one_process, rows), perform_initialization=False)
        model = build_model(model_cfg)
        ours = from_hf(state, model_cfg)
        missing = {k for k, _ in model.named_parameters()} - ours.keys()
        if missing:
            raise LlamaImportError(f"{directory} lacks the tensors for {sorted(missing)}")
        with torch.no_grad():
            # strict=False: megatron's linears also expect an (empty) _extra_state entry.
            model.load_state_dict(ours, strict=False)
        train_state = {"iteration": 0, "consumed_train_samples": 0, "consumed_valid_samples": 0}
        save_checkpoint(save, 0, [model], None, None, train_state, cfg.to_dict())
    finally:
        destroy_distributed()
    return flags
