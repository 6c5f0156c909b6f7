"""Shared fixtures: synthetic corpora, tiny SentencePiece models trained on the spot, and
in-process runs of the tools (no network, no shared data)."""

import gzip
import importlib.util
import io
import json
import lzma
import random
from pathlib import Path

import pytest
import zstandard

from megatron_lpa.tokenizers.sentencepiece_trainer import train_sentencepiece

REPO = Path(__file__).resolve().parents[2]

_SYLLABLES = ["ka", "lo", "mi", "ne", "ta", "ri", "so", "vu", "pe", "da", "qu", "ex", "th", "on"]
_WORDS = "the of and to in is was for on as with by at from that it an be this are".split()
_SPECIALS = ["café", "naïve", "日本語", "Ünïcödé", "🙂", "don't", "e.g.", "3.14", "1999", "x_y"]


def make_documents(count: int, seed: int = 0, words: int = 60) -> list[str]:
    """Deterministic English-like documents: sentences, paragraphs, digits, some Unicode,
    and the odd double space or tab."""
    rng = random.Random(seed)
    vocabulary = _WORDS + [
        "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(300)
    ]
    documents = []
    for _ in range(count):
        sentences = []
        for _ in range(rng.randint(1, max(1, words // 8))):
            sentence = [rng.choice(vocabulary + _SPECIALS) for _ in range(rng.randint(3, 12))]
            sentence[0] = sentence[0].capitalize()
            sentences.append(" ".join(sentence) + rng.choice([".", ".", "?", "!"]))
        text = ""
        for sentence in sentences:
            text += sentence + rng.choice([" ", " ", " ", "  ", "\n\n", "\t"])
        documents.append(text.strip())
    return documents


def write_jsonl(path: Path, records: list, compression: str | None = None) -> Path:
    """Writes records (dicts, or raw bytes lines) as JSON lines, optionally compressed."""
    data = b"".join(
        (r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records
    )
    if compression == "zst":
        data = zstandard.ZstdCompressor().compress(data)
    elif compression == "gz":
        data = gzip.compress(data)
    elif compression == "xz":
        data = lzma.compress(data)
    path.write_bytes(data)
    return path


@pytest.fixture(scope="session")
def documents() -> list[str]:
    return make_documents(400)


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory, documents) -> str:
    """A 400-piece SentencePiece BPE model trained on ``documents``."""
    prefix = tmp_path_factory.mktemp("sp") / "bpe400"
    return train_sentencepiece(documents, str(prefix), vocab_size=400, num_threads=1)


def load_tool(name: str):
    """Imports tools/<name>.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def preprocess_tool():
    return load_tool("preprocess_data")


@pytest.fixture
def run_preprocess(preprocess_tool, sp_model, capsys):
    """Runs preprocess_data.main in-process with the tiny SP model; returns (status, output)."""

    def run(*args: str, tokenizer: tuple = ()) -> tuple[int, str]:
        tokenizer = tokenizer or (
            "--tokenizer-type",
            "GPTSentencePieceTokenizer",
            "--tokenizer-model",
            sp_model,
        )
        status = preprocess_tool.main([*map(str, args), *tokenizer])
        captured = capsys.readouterr()
        return status, captured.out + captured.err

    return run


def read_text(path: Path) -> str:
    return io.open(path, encoding="utf-8").read()
