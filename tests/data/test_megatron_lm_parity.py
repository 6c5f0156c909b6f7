"""tools/preprocess_data.py writes the bytes Megatron-LM core_v0.16.1's own tool writes (its
output checked in under tests/fixtures/megatron_lm, with the commands in its README)."""

import filecmp

import pytest

from tests.data.conftest import REPO

FIXTURES = REPO / "tests" / "fixtures" / "megatron_lm"
SENTENCEPIECE = ("--tokenizer-type", "SentencePieceTokenizer",
                 "--tokenizer-model", str(FIXTURES / "sp.model"))

# fixture prefix: the flags Megatron-LM was run with (see the README there)
CASES = {
    "sp_eod": ("--append-eod",),
    "sp_eod_legacy": ("--append-eod", "--legacy-tokenizer"),
    "sp_eod_partitions2_sequential": ("--append-eod", "--workers", "2", "--partitions", "2",
                                      "--keep-sequential-samples"),
}


@pytest.mark.parametrize("case", CASES)
def test_same_bytes_as_megatron_lm(tmp_path, run_preprocess, case):
    status, output = run_preprocess("--input", FIXTURES / "input.jsonl", "--output-prefix",
                                    tmp_path / case, *CASES[case], tokenizer=SENTENCEPIECE)
    assert status == 0, output
    for suffix in (".bin", ".idx"):
        name = f"{case}_text_document{suffix}"
        assert filecmp.cmp(tmp_path / name, FIXTURES / name, shallow=False), name


def test_partitions_in_megatron_lms_interleaved_order_are_refused(tmp_path, run_preprocess):
    with pytest.raises(SystemExit):
        run_preprocess("--input", FIXTURES / "input.jsonl", "--output-prefix", tmp_path / "o",
                       "--workers", "2", "--partitions", "2", tokenizer=SENTENCEPIECE)
