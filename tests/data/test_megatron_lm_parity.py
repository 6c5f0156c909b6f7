"""tools/preprocess_data.py writes the bytes Megatron-LM core_v0.16.1's own tool writes (its
output checked in under tests/fixtures/megatron_lm, with the commands in its README)."""

import filecmp

import pytest

from tests.data.conftest import REPO

FIXTURES = REPO / "tests" / "fixtures" / "megatron_lm"
SENTENCEPIECE = (
    "--tokenizer-type",
    "SentencePieceTokenizer",
    "--tokenizer-model",
    str(FIXTURES / "sp.model"),
)

# fixture prefix: the flags Megatron-LM was run with (see the README there)
CASES = {
    "sp_eod": ("--append-eod",),
    "sp_eod_legacy": ("--append-eod", "--legacy-tokenizer"),
    "sp_eod_partitions2_sequential": (
        "--append-eod",
        "--workers",
        "2",
        "--partitions",
        "2",
        "--keep-sequential-samples",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_same_bytes_as_megatron_lm(tmp_path, run_preprocess, case):
    status, output = run_preprocess(
        "--input",
        FIXTURES / "input.jsonl",
        "--output-prefix",
        tmp_path / case,
        *CASES[case],
        tokenizer=SENTENCEPIECE,
    )
    assert status == 0, output
    for suffix in (".bin", ".idx"):
        name = f"{case}_text_document{suffix}"
        assert filecmp.cmp(tmp_path / name, FIXTURES / name, shallow=False), name


def test_partitions_in_megatron_lms_interleaved_order_are_refused(tmp_path, run_preprocess):
    with pytest.raises(SystemExit):
        run_preprocess(
            "--input",
            FIXTURES / "input.jsonl",
            "--output-prefix",
            tmp_path / "o",
            "--workers",
            "2",
            "--partitions",
            "2",
            tokenizer=SENTENCEPIECE,
        )


@pytest.mark.parametrize(
    "flag, instead",
    [
        ("--padded-vocab-size=32768", "drop it"),
        ("--vocab-extra-ids", "user_defined_symbols"),
        ("--tokenizer-special-tokens", "added_tokens"),
        ("--tokenizer-metadata", "drop it"),
        ("--tokenizer-sentencepiece-legacy", "drop it"),
        ("--tokenizer-hf-use-fast", "HuggingFaceTokenizer"),
        ("--trust-remote-code", "HuggingFaceTokenizer"),
        ("--tiktoken-pattern", "tokenizer.json"),
    ],
)
def test_megatron_lm_only_flags_say_what_to_use_instead(
    tmp_path, run_preprocess, capsys, flag, instead
):
    with pytest.raises(SystemExit):
        run_preprocess(
            "--input",
            FIXTURES / "input.jsonl",
            "--output-prefix",
            tmp_path / "o",
            flag,
            tokenizer=SENTENCEPIECE,
        )
    error = capsys.readouterr().err
    assert f"{flag.split('=')[0]} (Megatron-LM's) is not supported here" in error
    assert instead in error


@pytest.mark.parametrize(
    "tokenizer_type", ["BertWordPieceLowerCase", "BertWordPieceCase", "TikTokenizer"]
)
def test_megatron_lm_only_tokenizer_types_say_what_to_use_instead(
    tmp_path, run_preprocess, tokenizer_type
):
    status, output = run_preprocess(
        "--input",
        FIXTURES / "input.jsonl",
        "--output-prefix",
        tmp_path / "o",
        tokenizer=("--tokenizer-type", tokenizer_type),
    )
    assert status == 1
    assert f"--tokenizer-type {tokenizer_type} (Megatron-LM's) is not supported here" in output
    assert "--tokenizer-type HuggingFaceTokenizer" in output
