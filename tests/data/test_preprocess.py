"""tools/preprocess_data.py: output, input formats, options and bad input."""

import filecmp
import io
import json
import re

import nltk
import numpy as np
import pytest
import sentencepiece
import torch
import zstandard
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from nltk.tokenize.punkt import PunktTrainer

from megatron_lpa.data import json_documents
from megatron_lpa.data.indexed_reader import IndexedDatasetReader
from megatron_lpa.data.progress import ProgressReporter
from megatron_lpa.data.sentence_splitter import SentenceSplitter
from tests.data.conftest import make_documents, write_jsonl


def _megatron_lm_dataset(prefix, texts, sp_model):
    """What Megatron-LM's preprocess_data.py writes for GPTSentencePieceTokenizer with
    --append-eod: each document's ids plus </s>, through megatron-core's builder."""
    processor = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for text in texts:
        ids = processor.encode(text) + [processor.eos_id()]
        builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(f"{prefix}.idx")


def _same_dataset(prefix_a, prefix_b) -> bool:
    return all(
        filecmp.cmp(f"{prefix_a}{suffix}", f"{prefix_b}{suffix}", shallow=False)
        for suffix in (".bin", ".idx")
    )


def _outputs(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".jsonl"))


@pytest.mark.parametrize("workers", [1, 2])
def test_output_is_byte_identical_to_megatron_lm(
    tmp_path, run_preprocess, documents, sp_model, workers
):
    source = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in documents])
    status, output = run_preprocess(
        "--input", source, "--output-prefix", tmp_path / "out", "--append-eod", "--workers", workers
    )
    assert status == 0, output
    _megatron_lm_dataset(tmp_path / "reference", documents, sp_model)
    assert _same_dataset(tmp_path / "out_text_document", tmp_path / "reference")
    assert f"documents: {len(documents):,}" in output and "skipped lines: 0 bad" in output


def test_every_input_format_gives_the_same_dataset(tmp_path, run_preprocess, documents):
    records = [{"text": t, "meta": {"pile_set_name": "Wikipedia (en)"}} for t in documents]
    expected = tmp_path / "plain"
    write_jsonl(tmp_path / "corpus.jsonl", records)
    assert run_preprocess("--input", tmp_path / "corpus.jsonl", "--output-prefix", expected)[0] == 0
    for suffix in ("json", "jsonl.zst", "jsonl.gz", "jsonl.xz"):
        source = write_jsonl(tmp_path / f"corpus.{suffix}", records, suffix.split(".")[-1])
        status, output = run_preprocess("--input", source, "--output-prefix", tmp_path / suffix)
        assert status == 0, output
        assert _same_dataset(f"{expected}_text_document", tmp_path / f"{suffix}_text_document")

    # Shards: a glob over mixed compressions, and a .zst of several frames.
    (tmp_path / "shards").mkdir()
    write_jsonl(tmp_path / "shards" / "a.jsonl.gz", records[:100], "gz")
    write_jsonl(tmp_path / "shards" / "b.jsonl", records[100:150])
    frames = b"".join(
        zstandard.ZstdCompressor().compress(b"".join(json.dumps(r).encode() + b"\n" for r in part))
        for part in (records[150:300], records[300:])
    )
    (tmp_path / "shards" / "c.jsonl.zst").write_bytes(frames)
    status, output = run_preprocess(
        "--input",
        tmp_path / "shards" / "*",
        "--output-prefix",
        tmp_path / "sharded",
        "--workers",
        2,
    )
    assert status == 0, output
    assert _same_dataset(f"{expected}_text_document", tmp_path / "sharded_text_document")


def test_several_json_keys_make_one_dataset_each(tmp_path, run_preprocess, sp_model):
    records = [{"text": f"body number {i}.", "title": f"Title {i}"} for i in range(30)]
    source = write_jsonl(tmp_path / "c.jsonl", records)
    status, output = run_preprocess(
        "--input", source, "--output-prefix", tmp_path / "o", "--json-keys", "text", "title"
    )
    assert status == 0, output
    processor = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    for key in ("text", "title"):
        reader = IndexedDatasetReader(str(tmp_path / f"o_{key}_document"))
        assert [reader.document(i).tolist() for i in range(30)] == processor.encode(
            [r[key] for r in records]
        )


@pytest.mark.fault
def test_sentence_splitting_without_punkt_data_stops_unless_the_untrained_splitter_is_accepted(
    tmp_path, run_preprocess, monkeypatch, sp_model
):
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "no-nltk-data")])
    texts = make_documents(40, seed=4)
    source = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts])
    flags = ("--input", source, "--output-prefix", tmp_path / "o", "--split-sentences")
    status, output = run_preprocess(*flags)
    assert status == 1 and "error: --split-sentences: no nltk punkt data for 'english'" in output
    assert "python -m nltk.downloader punkt_tab" in output
    assert "--untrained-sentence-splitter" in output and _outputs(tmp_path) == []

    status, output = run_preprocess(*flags, "--workers", 2, "--untrained-sentence-splitter")
    assert status == 0, output
    assert output.count("no nltk punkt data") == 1
    reader = IndexedDatasetReader(str(tmp_path / "o_text_sentence"))
    splitter = SentenceSplitter(None, keep_newlines=False)
    processor = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    expected = [[ids for ids in processor.encode(splitter(t)) if ids] for t in texts]
    assert reader.num_sequences == sum(map(len, expected)) > reader.num_documents == len(texts)
    for i, sentences in enumerate(expected):
        first, end = reader.document_indices[i : i + 2]
        assert [reader.sequence(s).tolist() for s in range(first, end)] == sentences


def test_keep_newlines_keeps_them_with_their_sentence():
    text = "First one here.\n\nSecond one? Third one."
    assert SentenceSplitter(None, keep_newlines=False)(text) == [
        "First one here.",
        "Second one?",
        "Third one.",
    ]
    assert SentenceSplitter(None, keep_newlines=True)(text) == [
        "First one here.\n\n",
        "Second one? ",
        "Third one.",
    ]


def test_sentence_splitting_uses_installed_punkt_data(tmp_path, run_preprocess, monkeypatch):
    trainer = PunktTrainer()
    trainer.train("Dr. Who met Dr. Jones. Dr. Smith left. " * 50, finalize=True)
    params = trainer.get_params()
    model_dir = tmp_path / "nltk" / "tokenizers" / "punkt_tab" / "english"
    model_dir.mkdir(parents=True)
    encode = pytest.importorskip("nltk.tabdata").TabEncoder()  # punkt_tab's file format
    (model_dir / "collocations.tab").write_text(encode.tups2tab(params.collocations))
    (model_dir / "sent_starters.txt").write_text(encode.set2txt(params.sent_starters))
    (model_dir / "abbrev_types.txt").write_text(encode.set2txt(params.abbrev_types))
    (model_dir / "ortho_context.tab").write_text(encode.ivdict2tab(params.ortho_context))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nltk")])
    source = write_jsonl(tmp_path / "c.jsonl", [{"text": "Dr. Who came home. He slept."}])
    status, output = run_preprocess(
        "--input", source, "--output-prefix", tmp_path / "o", "--split-sentences"
    )
    assert status == 0 and "no nltk punkt data" not in output
    # The trained model knows "Dr." is an abbreviation: two sentences, not three.
    assert IndexedDatasetReader(str(tmp_path / "o_text_sentence")).num_sequences == 2


def test_pile_set_name_filter(tmp_path, run_preprocess, sp_model):
    records = [
        {"text": f"doc {i}", "meta": {"pile_set_name": name}}
        for i, name in enumerate(["Wikipedia (en)", "Github", "ArXiv"] * 5)
    ]
    source = write_jsonl(tmp_path / "c.jsonl", records)
    processor = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    for flag, kept in (
        (["--pile-set-names", "Wikipedia (en)", "ArXiv"], {"Wikipedia (en)", "ArXiv"}),
        (["--exclude-pile-set-names", "Github"], {"Wikipedia (en)", "ArXiv"}),
    ):
        status, output = run_preprocess("--input", source, "--output-prefix", tmp_path / "o", *flag)
        assert status == 0 and "5 filtered out" in output
        reader = IndexedDatasetReader(str(tmp_path / "o_text_document"))
        wanted = [r["text"] for r in records if r["meta"]["pile_set_name"] in kept]
        assert [
            reader.document(i).tolist() for i in range(reader.num_documents)
        ] == processor.encode(wanted)
    write_jsonl(source, [{"text": "no meta"}])
    status, output = run_preprocess("--input", source, "--output-prefix", tmp_path / "m", *flag)
    assert status == 1 and "c.jsonl:1: no meta.pile_set_name" in output


@pytest.mark.parametrize(
    "vocab_size, dtype", [(1000, np.uint16), (65499, np.uint16), (65500, np.int32)]
)
def test_dtype_follows_vocabulary_size(tmp_path, run_preprocess, vocab_size, dtype):
    # NullTokenizer's vocabulary: the ids below --vocab-size, and the end-of-document id.
    largest = vocab_size - 2
    source = write_jsonl(tmp_path / "c.jsonl", [{"text": "1 2 3"}, {"text": str(largest)}])
    tokenizer = ("--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab_size - 1))
    status, output = run_preprocess(
        "--input", source, "--output-prefix", tmp_path / "o", "--append-eod", tokenizer=tokenizer
    )
    assert status == 0, output
    reader = IndexedDatasetReader(str(tmp_path / "o_text_document"))
    assert reader.dtype == dtype
    assert reader.document(1).tolist() == [largest, vocab_size - 1]


GOOD = [{"text": f"good document {i}."} for i in range(6)]

BAD_LINES = {
    "malformed JSON": (b'{"text": "cut', "not valid JSON"),
    "missing key": ({"body": "x"}, "no key 'text' (keys: 'body'); check --json-keys"),
    "non-UTF-8": (b'{"text": "caf\xe9"}', "not valid UTF-8"),
    "empty document": ({"text": ""}, "empty document"),
    "blank document": ({"text": "  \n "}, "empty document"),
    "not a string": ({"text": 5}, "is a JSON number, not a string"),
    "blank line": (b"", "blank line"),
}


@pytest.mark.parametrize("case", BAD_LINES, ids=list(BAD_LINES))
def test_bad_lines_stop_the_run_or_are_skipped(tmp_path, run_preprocess, sp_model, case):
    bad, reason = BAD_LINES[case]
    source = write_jsonl(tmp_path / "c.jsonl", GOOD[:4] + [bad] + GOOD[4:])
    status, output = run_preprocess(
        "--input", source, "--output-prefix", tmp_path / "o", "--workers", 2
    )
    assert status == 1
    assert "c.jsonl:5: " in output and reason in output and "--skip-bad-lines" in output
    assert _outputs(tmp_path) == []  # no dataset, no temporary files

    status, output = run_preprocess(
        "--input", source, "--output-prefix", tmp_path / "o", "--skip-bad-lines", "--append-eod"
    )
    assert status == 0, output
    assert "skipped lines: 1 bad" in output and "c.jsonl:5: " in output
    _megatron_lm_dataset(tmp_path / "reference", [r["text"] for r in GOOD], sp_model)
    assert _same_dataset(tmp_path / "o_text_document", tmp_path / "reference")


@pytest.mark.parametrize("use_orjson", [True, False], ids=["orjson", "json"])
def test_parser_reasons_with_and_without_orjson(monkeypatch, use_orjson):
    if not use_orjson:
        monkeypatch.setattr(json_documents, "json_loads", json.loads)
        monkeypatch.setattr(json_documents, "HAVE_ORJSON", False)
    elif not json_documents.HAVE_ORJSON:
        pytest.skip("orjson is not installed")
    parser = json_documents.JsonDocumentParser(["text"])
    assert parser.parse(b'{"text": "caf\xc3\xa9", "n": 1}') == ["caf\u00e9"]
    for line, reason in [
        (b'{"text": "a\\ud800b"}', "surrogate"),
        (b'{"text": "caf\xe9"}', "not valid UTF-8"),
        (b"[1, 2]", "a JSON array, not an object"),
        (b'{"text": null}', "is a JSON null, not a string"),
        (b"{oops", "not valid JSON"),
    ]:
        with pytest.raises(json_documents.BadLineError, match=reason):
            parser.parse(line)


def test_text_the_tokenizer_rejects_is_a_bad_line(tmp_path, run_preprocess):
    source = write_jsonl(tmp_path / "c.jsonl", [{"text": "1 2"}, {"text": "one 2"}, {"text": "3"}])
    tokenizer = ("--tokenizer-type", "NullTokenizer", "--vocab-size", "10")
    status, output = run_preprocess(
        "--input", source, "--output-prefix", tmp_path / "o", tokenizer=tokenizer
    )
    assert status == 1 and "c.jsonl:2: cannot tokenize 'text'" in output
    status, output = run_preprocess(
        "--input",
        source,
        "--output-prefix",
        tmp_path / "o",
        "--skip-bad-lines",
        tokenizer=tokenizer,
    )
    reader = IndexedDatasetReader(str(tmp_path / "o_text_document"))
    assert status == 0 and [reader.document(i).tolist() for i in range(2)] == [[1, 2], [3]]


@pytest.mark.fault
@pytest.mark.parametrize("compression", ["zst", "gz", "xz"])
def test_truncated_input_keeps_the_documents_before_the_cut(tmp_path, run_preprocess, compression):
    records = [{"text": t} for t in make_documents(3000, seed=5, words=40)]
    whole = write_jsonl(tmp_path / f"whole.jsonl.{compression}", records, compression)
    cut = tmp_path / f"cut.jsonl.{compression}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    status, output = run_preprocess("--input", cut, "--output-prefix", tmp_path / "o")
    assert status == 1 and re.search(rf"cut\.jsonl\.{compression}:\d+: file is truncated", output)
    assert _outputs(tmp_path) == sorted([cut.name, whole.name])

    status, output = run_preprocess(
        "--input", cut, "--output-prefix", tmp_path / "o", "--skip-bad-lines"
    )
    stopped = re.search(rf"skipped .*cut\.jsonl\.{compression}:(\d+): file is truncated", output)
    assert status == 0 and stopped, output
    written = IndexedDatasetReader(str(tmp_path / "o_text_document")).num_documents
    # Every whole line before the one it stopped at (half the bytes hold a good part of them).
    assert written == int(stopped.group(1)) - 1 and len(records) / 4 < written < len(records)


@pytest.mark.parametrize("compression", ["zst", "gz", "xz"])
def test_corrupt_or_missing_input(tmp_path, run_preprocess, compression):
    junk = tmp_path / f"junk.jsonl.{compression}"
    junk.write_bytes(b"this is not compressed data" * 10)
    status, output = run_preprocess("--input", junk, "--output-prefix", tmp_path / "j")
    assert status == 1 and f"{junk.name}:1: cannot read the file" in output

    status, output = run_preprocess(
        "--input", tmp_path / "missing.jsonl", "--output-prefix", tmp_path / "m"
    )
    assert status == 1 and "missing.jsonl: no such file" in output


def test_flags_megatron_lm_recipes_pass(tmp_path, run_preprocess):
    source = write_jsonl(tmp_path / "c.jsonl", GOOD)
    base = ("--input", source, "--output-prefix")
    assert (
        run_preprocess(
            *base, tmp_path / "a", "--workers", 2, "--partitions", 2, "--keep-sequential-samples"
        )[0]
        == 0
    )
    assert run_preprocess(*base, tmp_path / "b", "--workers", 1)[0] == 0
    assert _same_dataset(tmp_path / "a_text_document", tmp_path / "b_text_document")
    with pytest.raises(SystemExit):
        run_preprocess(*base, tmp_path / "c", "--workers", 3, "--partitions", 2)
    status, output = run_preprocess(*base, tmp_path / "d", tokenizer=("--tokenizer-type", "Nope"))
    assert status == 1 and "unknown --tokenizer-type 'Nope'" in output


def test_progress_reports_rates(tmp_path, run_preprocess):
    source = write_jsonl(
        tmp_path / "c.jsonl", [{"text": t} for t in make_documents(3000, seed=6, words=10)]
    )
    status, output = run_preprocess(
        "--input", source, "--output-prefix", tmp_path / "o", "--log-interval", 500
    )
    assert status == 0
    progress = [line for line in output.splitlines() if line.startswith("processed ")]
    assert progress and all("docs/s" in p and "MB/s" in p and "tokens/s" in p for p in progress)
    assert "documents: 3,000" in output

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    reporter = ProgressReporter(total_file_bytes=1000, log_interval=10, stream=terminal)
    reporter.update(documents=50, input_bytes=4000, tokens=900, file_bytes_done=500)
    reporter.close()
    assert "50%" in terminal.getvalue() and "docs/s" in terminal.getvalue()
