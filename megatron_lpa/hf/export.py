"""A trained model as a Hugging Face model directory: ``LlamaForCausalLM`` (merged) or the
factored LPA model of ``modeling_lpa.py`` (``trust_remote_code``).

``export(saved, directory, form)`` writes ``config.json``, ``model.safetensors`` and the tokenizer
(``tokenizer.json``, ``tokenizer_config.json`` and, for SentencePiece, ``tokenizer.model``) into a
temporary directory beside ``directory`` and renames it into place when complete.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_lpa.hf import configuration_lpa, modeling_lpa
from megatron_lpa.hf.state_dict import merge_low_rank, to_hf
from megatron_lpa.models.lpa_config import LPAConfig

FORMS = ("merged", "factored")
ACTIVATION_NAMES = {F.silu: "silu", F.gelu: "gelu", F.relu: "relu"}
SENTENCEPIECE_TYPES = ("GPTSentencePieceTokenizer", "Llama2Tokenizer")
AUTO_MAP = {
    "AutoConfig": "configuration_lpa.LpaConfig",
    "AutoModelForCausalLM": "modeling_lpa.LpaForCausalLM",
}


class ExportError(ValueError):
    """A model the chosen form cannot express, or a directory that cannot be written."""


def _shape(config: LPAConfig, vocab_size: int) -> dict:
    """The Hugging Face config fields that Llama's and ours share."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups or config.num_attention_heads,
        head_dim=config.kv_channels,
        max_position_embeddings=config.max_sequence_length,
        rope_theta=float(config.rotary_base),
        tie_word_embeddings=config.share_embeddings_and_output_weights,
    )


def lpa_config(config: LPAConfig, vocab_size: int, special_ids: dict):
    """The factored model's ``LpaConfig`` (every form and variant)."""
    return configuration_lpa.LpaConfig(
        **_shape(config, vocab_size),
        normalization=config.normalization,
        norm_eps=config.layernorm_epsilon,
        hidden_act=ACTIVATION_NAMES[config.activation_func],
        gated_mlp=config.gated_linear_unit,
        position_embedding_type=config.position_embedding_type,
        sublayer_norm=config.sublayer_norm,
        bias=config.add_bias_linear,
        output_layer_bias=config.output_layer_bias,
        lpa_attn_rank=config.lpa_attn_rank,
        lpa_ffn_rank=config.lpa_ffn_rank,
        architectures=["LpaForCausalLM"],
        auto_map=AUTO_MAP,
        **special_ids,
    )


def llama_config(config: LPAConfig, vocab_size: int, special_ids: dict):
    """``LlamaConfig`` of the merged model; ``ExportError`` listing what Llama cannot express."""
    from transformers import LlamaConfig

    problems = []
    if config.normalization != "RMSNorm":
        problems.append(f"{config.normalization} (Llama has RMSNorm)")
    if not (config.gated_linear_unit and config.activation_func is F.silu):
        problems.append(f"a {ACTIVATION_NAMES[config.activation_func]} FFN (Llama has SwiGLU)")
    if config.position_embedding_type != "rope":
        problems.append("learned positions (Llama has RoPE)")
    if config.sublayer_norm != "input":
        problems.append("the output-norm block, --sublayer-norm output (Llama is pre-norm)")
    if config.output_layer_bias:
        problems.append("an output-layer bias (Llama's head has none)")
    if config.hidden_size % config.num_attention_heads:
        problems.append(
            f"hidden size {config.hidden_size} not a multiple of {config.num_attention_heads} heads"
        )
    if problems:
        raise ExportError(
            "LlamaForCausalLM cannot express "
            + "; ".join(problems)
            + ". Export with --format factored, which keeps the model as it is."
        )
    return LlamaConfig(
        **_shape(config, vocab_size),
        rms_norm_eps=config.layernorm_epsilon,
        hidden_act="silu",
        attention_bias=config.add_bias_linear,
        mlp_bias=config.add_bias_linear,
        architectures=["LlamaForCausalLM"],
        **special_ids,
    )


def export(saved, directory: str, form: str) -> str:
    """Writes ``saved`` (a ``SavedModel`` at TP=1, PP=1) as a Hugging Face model in ``form``.

    Returns a line saying what the tokenizer became. Raises ``ExportError`` when ``directory``
    exists or ``form`` cannot express the model, before anything is written.
    """
    if os.path.exists(directory):
        raise ExportError(
            f"{directory} exists; give a new --save directory (nothing is overwritten)."
        )
    vocab = saved.tokenizer.vocab_size if saved.tokenizer is not None else saved.cfg.data.vocab_size
    special_ids = _special_ids(saved.tokenizer)
    state = to_hf({k: v.detach() for k, v in saved.model.named_parameters()}, saved.config, vocab)
    if form == "merged":
        hf_config, state = llama_config(saved.config, vocab, special_ids), merge_low_rank(state)
    else:
        hf_config = lpa_config(saved.config, vocab, special_ids)
    parent = Path(directory).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{Path(directory).name}.tmp-", dir=parent))
    try:
        # The tokenizer first: building it, transformers reads any config.json already there,
        # and the factored one's model type loads only with trust_remote_code.
        tokenizer_note = _write_tokenizer(saved.cfg, temp)
        _write_weights(state, temp / "model.safetensors")
        hf_config.save_pretrained(temp)
        if form == "factored":
            for module in (configuration_lpa, modeling_lpa):
                shutil.copy(module.__file__, temp / Path(module.__file__).name)
        os.chmod(temp, 0o755)  # mkdtemp's 0700 would stay with the published directory
        os.rename(temp, directory)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return tokenizer_note


def _write_weights(state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    # safetensors refuses tensors that share storage (our fused slots' views).
    save_file(
        {k: v.clone(memory_format=torch.contiguous_format) for k, v in state.items()},
        str(path),
        metadata={"format": "pt"},
    )


def _special_ids(tokenizer) -> dict:
    if tokenizer is None:
        return {}
    bos = getattr(tokenizer, "bos", None)
    return {
        "eos_token_id": tokenizer.eod,
        "bos_token_id": bos if bos is not None and bos >= 0 else None,
    }


def _write_tokenizer(cfg, directory: Path) -> str:
    """The run's tokenizer as Hugging Face tokenizer files; returns what was written."""
    kind = cfg.data.tokenizer_type
    if kind in SENTENCEPIECE_TYPES:
        from transformers import AutoTokenizer

        # transformers builds a tokenizer that encodes as SentencePiece does from the model's
        # own normaliser and pieces; saving it writes tokenizer.json for tools without
        # sentencepiece.
        shutil.copy(cfg.data.tokenizer_model, directory / "tokenizer.model")
        (directory / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "TokenizersBackend"})
        )
        AutoTokenizer.from_pretrained(str(directory)).save_pretrained(str(directory))
        note = "tokenizer.model, tokenizer.json (no BOS added, as the run's tokenizer)"
        return (
            note
            if kind == "GPTSentencePieceTokenizer"
            else note.replace(
                "as the run's tokenizer", "unlike Llama2Tokenizer: prepend <s> to prompts"
            )
        )
    if kind == "HuggingFaceTokenizer":
        source = Path(cfg.data.tokenizer_model)
        tokenizer_file = source / "tokenizer.json" if source.is_dir() else source
        shutil.copy(tokenizer_file, directory / "tokenizer.json")
        written = ["tokenizer.json"]
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (tokenizer_file.parent / name).is_file():
                shutil.copy(tokenizer_file.parent / name, directory / name)
                written.append(name)
        return ", ".join(written) + " (copied)"
    return (
        f"no tokenizer written: --tokenizer-type {kind} has no Hugging Face form here"
        if kind
        else "no tokenizer (the run trained on --mock-data)"
    )


def factored_model(saved):
    """``saved`` (TP=1, PP=1) as the factored ``LpaForCausalLM``, in memory, in eval mode, on the
    model's device and dtype; the vocabulary cut to the tokenizer's."""
    vocab = saved.tokenizer.vocab_size if saved.tokenizer is not None else saved.cfg.data.vocab_size
    state = to_hf({k: v.detach() for k, v in saved.model.named_parameters()}, saved.config, vocab)
    first = next(iter(state.values()))
    with torch.device("meta"):
        model = modeling_lpa.LpaForCausalLM(
            lpa_config(saved.config, vocab, _special_ids(saved.tokenizer))
        )
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=first.device, dtype=first.dtype).eval()
