"""Tokenizers: Megatron-LM's type names and ids, and the exact SentencePiece word cache."""

import json

import numpy as np
import pytest
import sentencepiece

from megatron_lpa.tokenizers import TokenizerConfigError, build_tokenizer
from megatron_lpa.tokenizers.gpt2_bpe_tokenizer import GPT2BPETokenizer, bytes_to_unicode
from megatron_lpa.tokenizers.sentencepiece_trainer import train_sentencepiece
from megatron_lpa.tokenizers.sentencepiece_word_cache import (
    SentencePieceWordCache,
    sentencepiece_model_type,
)
from tests.data.conftest import make_documents

# Texts that stress normalization and whitespace: runs of spaces, tabs, newlines, leading
# and trailing blanks, the whitespace mark itself, control and full-width characters.
AWKWARD_TEXTS = [
    "",
    " ",
    "plain words here",
    "  leading and trailing  ",
    "tabs\tand\nnew\n\nlines",
    "double  space   triple",
    "the mark \u2581 itself\u2581glued",
    "control\x1cchar and nbsp\xa0here",
    "full\u3000width ＡＢＣ ｶﾀｶﾅ",
    "emoji 🙂🙂 and 日本語テキスト",
    "ﬁ ligature and e\u0301 combining",
    "<EOD> inside text </s>",
]


def _assert_batch_matches_single(tokenizer, texts):
    tokens, lengths = tokenizer.tokenize_batch_to_array(texts, np.int32)
    expected = [tokenizer.tokenize(text) for text in texts]
    assert lengths.tolist() == [len(ids) for ids in expected]
    assert tokens.tolist() == [i for ids in expected for i in ids]
    assert tokenizer.tokenize_batch(texts) == expected


def test_build_tokenizer_errors_name_the_flag(tmp_path):
    with pytest.raises(TokenizerConfigError, match="GPTSentencePieceTokenizer"):
        build_tokenizer("NoSuchTokenizer")
    with pytest.raises(TokenizerConfigError, match="needs --tokenizer-model"):
        build_tokenizer("Llama2Tokenizer")
    with pytest.raises(TokenizerConfigError, match="needs --merge-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(tmp_path))
    with pytest.raises(TokenizerConfigError, match=r"--tokenizer-model .*missing.model does not"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "missing.model"))
    with pytest.raises(TokenizerConfigError, match="needs --vocab-size"):
        build_tokenizer("NullTokenizer")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerConfigError, match="junk.model is not a SentencePiece model"):
        build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=str(tmp_path / "junk.model"))


def test_gpt_sentencepiece_matches_sentencepiece(sp_model, documents):
    processor = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    tokenizer = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=sp_model)
    assert tokenizer.vocab_size == 400
    assert tokenizer.eod == processor.eos_id() == tokenizer.eos
    assert tokenizer.bos == processor.bos_id() and tokenizer.pad == processor.pad_id()
    texts = documents[:50] + AWKWARD_TEXTS
    assert [tokenizer.tokenize(t) for t in texts] == [processor.encode(t) for t in texts]
    assert tokenizer.detokenize(tokenizer.tokenize("Hello there")) == "Hello there"


@pytest.mark.parametrize(
    "trainer_options, cache_applies",
    [
        ({"model_type": "bpe"}, True),  # nmt_nfkc, whitespace collapsed
        ({"model_type": "unigram"}, False),
        # LLaMA-like: whitespace kept as it is, whitespace-only pieces
        (
            {
                "model_type": "bpe",
                "normalization_rule_name": "identity",
                "remove_extra_whitespaces": False,
            },
            True,
        ),
        ({"model_type": "bpe", "add_dummy_prefix": False}, False),
        ({"model_type": "bpe", "treat_whitespace_as_suffix": True}, False),
        ({"model_type": "bpe", "split_by_whitespace": False}, False),  # pieces span words
        # Rules x -> y, y -> z: normalizing twice differs from once, so words holding y
        # cannot be encoded alone.
        ({"model_type": "bpe", "normalization_rule_tsv": "78\t79\n79\t7A\n"}, True),
    ],
    ids=[
        "bpe",
        "unigram",
        "llama-like",
        "no-dummy-prefix",
        "whitespace-suffix",
        "cross-word-pieces",
        "xyz-rules",
    ],
)
def test_word_cache_gives_sentencepiece_ids(tmp_path, documents, trainer_options, cache_applies):
    prefix = str(tmp_path / "model")
    if "normalization_rule_tsv" in trainer_options:
        rules = tmp_path / "rules.tsv"
        rules.write_text(trainer_options["normalization_rule_tsv"])
        trainer_options = dict(trainer_options, normalization_rule_tsv=str(rules))
    # Words with x, y and z for the rules; a frequent phrase for pieces spanning words.
    documents = documents + ["xylophone yxy xx yy zz"] * 20 + ["of the " * 20] * 20
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(documents),
        model_prefix=prefix,
        vocab_size=600,
        byte_fallback=True,
        allow_whitespace_only_pieces=True,
        minloglevel=2,
        num_threads=1,
        **trainer_options,
    )
    processor = sentencepiece.SentencePieceProcessor(model_file=prefix + ".model")
    assert sentencepiece_model_type(processor) == (
        2 if trainer_options["model_type"] == "bpe" else 1
    )
    cache = SentencePieceWordCache(processor, max_words=50)  # overflows: clearing is exercised
    assert cache.is_exact == cache_applies
    texts = make_documents(60, seed=1) + AWKWARD_TEXTS + ["xylophone yxy xx yy", "of the zz"]
    for batch in (texts[:30], texts[30:], texts):  # cold, then warm cache
        expected = processor.encode(batch)
        tokens, lengths = cache.encode(batch)
        assert tokens.tolist() == [i for ids in expected for i in ids]
        assert lengths.tolist() == [len(ids) for ids in expected]
    if cache_applies:  # memory stays bounded: the cache was emptied when it outgrew 50 words
        words = {w for t in texts for w in processor.normalize(t).split("\u2581")}
        assert 50 < len(cache) < len(words)


def test_llama2_tokenizer_starts_each_text_with_bos(sp_model):
    tokenizer = build_tokenizer("Llama2Tokenizer", tokenizer_model=sp_model)
    processor = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    assert tokenizer.tokenize("a b") == [processor.bos_id()] + processor.encode("a b")
    assert tokenizer.eod == processor.eos_id()
    _assert_batch_matches_single(tokenizer, AWKWARD_TEXTS)


def test_legacy_sentencepiece_tokenizer_adds_megatron_special_tokens(sp_model):
    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model)
    processor = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    # <CLS> <SEP> <EOD> <MASK> and <PAD> are new; <s> and </s> exist in the model.
    assert tokenizer.vocab_size == 405
    assert tokenizer.eod == 402 and tokenizer.pad == 404
    assert tokenizer.bos == processor.bos_id() and tokenizer.eos == processor.eos_id()
    ids = tokenizer.tokenize("one<EOD>two </s>")
    expected = processor.encode("one") + [402] + processor.encode("two ") + [processor.eos_id()]
    assert ids == expected
    assert tokenizer.detokenize(ids) == "one <EOD> two </s> "
    _assert_batch_matches_single(tokenizer, AWKWARD_TEXTS)
    _assert_batch_matches_single(tokenizer, [t for t in AWKWARD_TEXTS if "<" not in t])


def test_null_tokenizer():
    tokenizer = build_tokenizer("NullTokenizer", vocab_size=100)
    assert tokenizer.tokenize("5 17  3") == [5, 17, 3]
    assert tokenizer.eod == 100 and tokenizer.vocab_size == 101
    assert tokenizer.detokenize([5, 17]) == "5 17"
    tokens, lengths = tokenizer.tokenize_batch_to_array(["1 2", "", "3"], np.uint16)
    assert tokens.tolist() == [1, 2, 3] and lengths.tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="--vocab-size"):
        tokenizer.tokenize("5 100")


def _write_gpt2_files(tmp_path, vocab: dict, merges: list[str]):
    vocab_file, merge_file = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
    merge_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return str(vocab_file), str(merge_file)


def test_gpt2_bpe_applies_merges_by_rank(tmp_path):
    byte_chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(byte_chars)}
    space = bytes_to_unicode()[ord(" ")]
    merges = ["l o", "lo w", f"{space} lo", "e r"]
    for merge in merges:
        vocab["".join(merge.split())] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = GPT2BPETokenizer(*_write_gpt2_files(tmp_path, vocab, merges))
    names = {i: token for token, i in vocab.items()}
    pieces = [names[i] for i in tokenizer.tokenize("low lower")]
    # " lower": "l o" (rank 0) first, then "lo w" (rank 1) before " lo" (rank 2), then "e r".
    assert pieces == ["low", space, "low", "er"]
    assert tokenizer.eod == vocab["<|endoftext|>"]
    assert tokenizer.detokenize(tokenizer.tokenize("low lower 🙂 é")) == "low lower 🙂 é"


def test_gpt2_bpe_matches_huggingface_tokenizers(tmp_path, documents):
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.ByteLevelBPETokenizer()
    hf.train_from_iterator(documents, vocab_size=500, special_tokens=["<|endoftext|>"])
    hf.save_model(str(tmp_path))
    ours = build_tokenizer(
        "GPT2BPETokenizer",
        vocab_file=str(tmp_path / "vocab.json"),
        merge_file=str(tmp_path / "merges.txt"),
    )
    for text in make_documents(30, seed=3) + AWKWARD_TEXTS:
        assert ours.tokenize(text) == hf.encode(text).ids
        assert ours.detokenize(ours.tokenize(text)) == text


def test_huggingface_tokenizer_json(tmp_path, documents):
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.ByteLevelBPETokenizer()
    hf.train_from_iterator(documents, vocab_size=500, special_tokens=["<pad>", "</s>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "</s>"}, "pad_token": "<pad>"})
    )
    tokenizer = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))
    assert tokenizer.eod == hf.token_to_id("</s>") and tokenizer.pad == hf.token_to_id("<pad>")
    assert tokenizer.vocab_size == hf.get_vocab_size()
    assert tokenizer.tokenize("Hello world") == hf.encode("Hello world").ids
    _assert_batch_matches_single(tokenizer, documents[:20])
    (tmp_path / "tokenizer_config.json").unlink()
    fallback = build_tokenizer(
        "HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "tokenizer.json")
    )
    assert fallback.eod == hf.token_to_id("</s>") and fallback.pad == -1
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerConfigError, match="not a Hugging Face tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "junk"))


def test_train_sentencepiece_writes_model_atomically(tmp_path, documents):
    model = train_sentencepiece(documents, str(tmp_path / "m"), vocab_size=450, num_threads=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.model", "m.vocab"]
    processor = sentencepiece.SentencePieceProcessor(model_file=model)
    assert processor.get_piece_size() == 450
    assert sentencepiece_model_type(processor) == 2
