"""tools/export_hf.py: checkpoints saved at TP=2 and PP=2, exported merged (LlamaForCausalLM) and
factored (our modeling file, trust_remote_code), load in transformers with our logits (fp32,
<= 1e-5); the tokenizer travels; what Llama cannot express is refused with the reason."""

import json
import subprocess
import sys

import pytest
import torch

from tests.data.conftest import REPO
from tests.hf.conftest import KINDS, VOCAB


def hf_logits(directory, tokens) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        directory, trust_remote_code=True, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("kind", KINDS)
def test_factored_export_computes_our_logits(exported, kind):
    reference, out = exported(kind)
    config = json.loads((out / "factored" / "config.json").read_text())
    assert config["architectures"] == ["LpaForCausalLM"] and config["vocab_size"] == VOCAB
    torch.testing.assert_close(
        hf_logits(out / "factored", reference["tokens"]), reference["logits"], rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("kind", ["llama_lpa_gqa_bias", "llama_lowrank_ffn_tied"])
def test_merged_export_is_a_llama_with_our_logits(exported, kind):
    from safetensors.torch import load_file

    reference, out = exported(kind)
    config = json.loads((out / "merged" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["rms_norm_eps"] == 1e-6
    assert (config.get("rope_parameters") or config)["rope_theta"] == 5000
    assert config["tie_word_embeddings"] == (kind == "llama_lowrank_ffn_tied")
    assert not any(
        ".A." in key or ".B." in key for key in load_file(out / "merged" / "model.safetensors")
    )
    torch.testing.assert_close(
        hf_logits(out / "merged", reference["tokens"]), reference["logits"], rtol=0, atol=1e-5
    )


def test_merged_folds_each_pair_exactly(exported):
    """W = B A and the r-wide bias c becomes B c, in fp32."""
    from safetensors.torch import load_file

    _, out = exported("llama_lpa_gqa_bias")
    factored = load_file(out / "factored" / "model.safetensors")
    merged = load_file(out / "merged" / "model.safetensors")
    config = json.loads((out / "merged" / "config.json").read_text())
    assert config["attention_bias"] and config["mlp_bias"]
    name = "model.layers.1.self_attn.k_proj"
    down, up = factored[f"{name}.A.weight"], factored[f"{name}.B.weight"]
    assert torch.equal(merged[f"{name}.weight"], up @ down)
    assert torch.equal(merged[f"{name}.bias"], up @ factored[f"{name}.A.bias"])
    assert factored[f"{name}.A.bias"].abs().sum() > 0  # trained away from its zero init


@pytest.mark.parametrize("kind", ["gpt_output_norm_lowrank_all", "gpt_relu_dense"])
def test_merged_refuses_what_llama_cannot_express(exported, kind):
    reference, out = exported(kind)
    message = reference["refused"]["merged"]
    assert "LayerNorm" in message and "learned positions" in message
    assert "--format factored" in message
    assert ("output-norm block" in message) == (kind == "gpt_output_norm_lowrank_all")
    assert ("output-layer bias" in message) == (kind == "gpt_output_norm_lowrank_all")
    assert not (out / "merged").exists()


def test_tokenizer_travels(exported, corpus):
    from transformers import AutoTokenizer

    from megatron_lpa.tokenizers import build_tokenizer

    _, out = exported("llama_lpa_gqa_bias")
    ours = build_tokenizer("GPTSentencePieceTokenizer", str(corpus / "tok.model"))
    for form in ("merged", "factored"):
        assert (out / form / "tokenizer.model").read_bytes() == (corpus / "tok.model").read_bytes()
        theirs = AutoTokenizer.from_pretrained(out / form, trust_remote_code=True)
        for line in (corpus / "corpus.jsonl").read_text().splitlines()[:20]:
            text = json.loads(line)["text"]
            assert theirs(text)["input_ids"] == ours.tokenize(text)


def test_tool_refuses_an_existing_directory_and_writes_nothing(checkpoints, tmp_path):
    target = tmp_path / "hf"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/export_hf.py"),
            "--load",
            str(checkpoints("gpt_relu_dense")),
            "--save",
            str(target),
            "--format",
            "factored",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and f"{target} exists" in done.stderr
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary directory left
