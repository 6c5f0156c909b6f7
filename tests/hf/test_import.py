"""tools/import_hf.py: a dense Llama imported and exported again is the same model, tensor for
tensor; with LPA ranks every projection becomes its truncated SVD, whose error is the
Eckart-Young bound; the printed flags train on from the checkpoint at TP=2."""

import json
import shlex
import shutil

import pytest
import torch

from megatron_lpa.hf.state_dict import factorize
from tests.data.conftest import REPO
from tests.hf.conftest import VOCAB, python
from tests.launch import torchrun


def test_truncated_svd_factors_are_the_best_rank_r_approximation():
    weight = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    down, up = factorize(weight, 8)
    assert down.shape == (8, 32) and up.shape == (48, 8)
    singular = torch.linalg.svdvals(weight)
    error = torch.linalg.matrix_norm(weight - up @ down)
    torch.testing.assert_close(error, singular[8:].square().sum().sqrt())
    # The singular values are split evenly: A A^T = B^T B = diag(S_r).
    torch.testing.assert_close(down @ down.T, torch.diag(singular[:8]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(up.T @ up, torch.diag(singular[:8]), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def llama(corpus, tmp_path_factory):
    """A random LlamaForCausalLM with GQA, untied, with our SentencePiece tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("llama") / "llama"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=20000.0,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    shutil.copy(corpus / "tok.model", directory / "tokenizer.model")
    return directory


def weights(directory) -> dict:
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def import_and_export(llama, tmp_path, form: str, *flags) -> tuple:
    done = python(
        "tools/import_hf.py",
        "--load",
        llama,
        "--save",
        tmp_path / "ckpt",
        "--seq-length",
        32,
        "--tensor-model-parallel-size",
        2,
        *flags,
    )
    python(
        "tools/export_hf.py",
        "--load",
        tmp_path / "ckpt",
        "--save",
        tmp_path / "hf",
        "--format",
        form,
    )
    return done.stdout.strip().splitlines()[-1], tmp_path / "hf"


def test_import_then_merged_export_is_the_original(llama, tmp_path):
    _, exported = import_and_export(llama, tmp_path, "merged")
    original, again = weights(llama), weights(exported)
    assert again.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(again[key], tensor), key
    config, original_config = (
        json.loads((d / "config.json").read_text()) for d in (exported, llama)
    )
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_key_value_heads",
        "rms_norm_eps",
        "vocab_size",
        "head_dim",
    ):
        assert config[key] == original_config[key], key


def test_lpa_import_is_the_truncated_svd_and_trains_on(llama, corpus, tmp_path):
    command, exported = import_and_export(
        llama, tmp_path, "factored", "--lpa-attn-rank", "8", "--lpa-ffn-rank", "16"
    )
    original, factored = weights(llama), weights(exported)
    for key, weight in original.items():
        if not key.endswith("_proj.weight"):
            assert torch.equal(factored[key], weight), key
            continue
        name, rank = key[: -len(".weight")], 8 if ".self_attn." in key else 16
        product = factored[f"{name}.B.weight"] @ factored[f"{name}.A.weight"]
        best = torch.linalg.svdvals(weight)[rank:].square().sum().sqrt()
        torch.testing.assert_close(
            torch.linalg.matrix_norm(weight - product), best, rtol=1e-4, atol=1e-6
        )
    # The printed command trains on from the checkpoint at TP=2.
    words = shlex.split(command)
    assert words[:4] == ["torchrun", "--nproc-per-node", "2", "pretrain_gpt.py"]
    output = torchrun(
        str(REPO / "pretrain_gpt.py"),
        2,
        *words[4:],
        "--data-path",
        corpus / "corpus_text_document",
        "--split",
        "98,1,1",
        "--lr",
        "1e-3",
        "--micro-batch-size",
        "2",
        "--train-iters",
        "2",
        "--eval-iters",
        "0",
        "--num-workers",
        "0",
        "--log-interval",
        "1",
    )
    assert f"Resumed from {tmp_path / 'ckpt'} at iteration 0" in output
    assert "iteration        2/       2" in output
