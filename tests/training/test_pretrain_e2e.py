"""pretrain_gpt.py end to end: TP=2, PP=2 and DP=2 runs train and evaluate on data our tools made;
each bad configuration stops before any work, saying what to change; a YAML --config sets options.
"""

import math
import re

import pytest
import torch

from megatron_lpa.config.command_line import parse_args
from tests.data.conftest import REPO, load_tool, make_documents, write_jsonl
from tests.launch import torchrun

PRETRAIN = str(REPO / "pretrain_gpt.py")
SHAPE = "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 32".split()
# A configuration parse_args accepts at any world size up to 4 (mock data: no files needed).
VALID = SHAPE + "--lr 1e-3 --train-iters 2 --mock-data --vocab-size 128".split()
# A LLaMA-style LPA model: 12 steps of 4 micro-batches, logged every 3, validated at 6 and 12.
TINY_LPA_RUN = (
    SHAPE
    + (
        "--swiglu --normalization RMSNorm --position-embedding-type rope --disable-bias-linear "
        "--untie-embeddings-and-output-weights --ffn-hidden-size 64 --lpa-attn-rank 8 "
        "--micro-batch-size 2 --global-batch-size 8 --train-iters 12 --lr 1e-2 --lr-warmup-iters 2 "
        "--hidden-dropout 0 --attention-dropout 0 --log-interval 3 --eval-interval 6 "
        "--eval-iters 2 --num-workers 0"
    ).split()
)
TRAIN_LINE = re.compile(r"^iteration\s+(\d+)/\s*\d+ \| loss (\S+) ", re.MULTILINE)


def eval_losses(output: str, split: str) -> list:
    pattern = rf"^{split} at iteration \d+: loss (\S+) "
    return [float(loss) for loss in re.findall(pattern, output, re.MULTILINE)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """A 400-piece tokenizer and an indexed dataset of 300 documents, made by our tools."""
    root = tmp_path_factory.mktemp("e2e_data")
    corpus = write_jsonl(root / "corpus.jsonl", [{"text": t} for t in make_documents(300)])
    tokenizer = {"prefix": root / "tok", "model": root / "tok.model"}
    trained = load_tool("train_tokenizer").main(
        f"--input {corpus} --model-prefix {tokenizer['prefix']} --vocab-size 400 "
        "--num-threads 1".split()
    )
    preprocessed = load_tool("preprocess_data").main(
        f"--input {corpus} --output-prefix {root / 'corpus'} --append-eod --workers 1 "
        f"--tokenizer-type GPTSentencePieceTokenizer --tokenizer-model {tokenizer['model']}".split()
    )
    assert trained == preprocessed == 0
    return {"prefix": str(root / "corpus_text_document"), "tokenizer": str(tokenizer["model"])}


def data_flags(dataset: dict, data_path: str = None, split: str = "90,5,5") -> list:
    """Real-data flags; ``data_path`` and ``split`` replace the dataset's."""
    return [
        *("--data-path", data_path or dataset["prefix"], "--split", split),
        *(
            "--tokenizer-type",
            "GPTSentencePieceTokenizer",
            "--tokenizer-model",
            dataset["tokenizer"],
        ),
    ]


# ----- training runs -----------------------------------------------------------------------------
LAYOUTS = {
    "tp2_sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "dp2_distributed_optimizer": ["--use-distributed-optimizer"],
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_process_run_trains_and_evaluates(dataset, layout):
    output = torchrun(PRETRAIN, 2, *TINY_LPA_RUN, *data_flags(dataset), *LAYOUTS[layout])
    steps = [(int(step), float(loss)) for step, loss in TRAIN_LINE.findall(output)]
    assert [step for step, _ in steps] == [3, 6, 9, 12], output[-3000:]
    losses = [loss for _, loss in steps]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0] - 0.5, f"loss did not go down: {losses}"
    validation, test = eval_losses(output, "validation"), eval_losses(output, "test")
    assert len(validation) == 2 and len(test) == 1, output[-3000:]
    assert all(math.isfinite(loss) for loss in validation + test)
    assert validation[-1] < validation[0]


# The paper's GPT-style block (setting 1's flags), small: output norms, an output-layer bias,
# PyTorch-default init, dropout only on the normalised sublayer outputs.
PAPER_BLOCK_RUN = (
    SHAPE
    + (
        "--normalization LayerNorm --activation relu --position-embedding-type learned_absolute "
        "--sublayer-norm output --output-layer-bias --init-style pytorch --embedding-dropout 0 "
        "--hidden-dropout 0.1 --attention-dropout 0 --untie-embeddings-and-output-weights "
        "--ffn-hidden-size 64 --lpa-attn-rank 8 --micro-batch-size 2 --global-batch-size 8 "
        "--lr 1e-3 --lr-warmup-iters 2 --log-interval 3 --eval-interval 6 --eval-iters 1 "
        "--num-workers 0"
    ).split()
)


def test_paper_block_trains_saves_and_resumes_at_another_layout(dataset, tmp_path):
    """Trained at TP=2 with SP, resumed (weights and optimizer resharded) at PP=2."""
    save = ["--save", str(tmp_path / "ckpt"), "--save-interval", "6"]
    first = torchrun(
        PRETRAIN,
        2,
        *PAPER_BLOCK_RUN,
        *data_flags(dataset),
        "--train-iters",
        "6",
        *save,
        "--tensor-model-parallel-size",
        "2",
        "--sequence-parallel",
    )
    resumed = torchrun(
        PRETRAIN,
        2,
        *PAPER_BLOCK_RUN,
        *data_flags(dataset),
        "--train-iters",
        "12",
        *save,
        "--load",
        str(tmp_path / "ckpt"),
        "--pipeline-model-parallel-size",
        "2",
    )
    assert "Resumed from" in resumed and "at iteration 6" in resumed, resumed[-3000:]
    before = [float(loss) for step, loss in TRAIN_LINE.findall(first)]
    after = [(int(step), float(loss)) for step, loss in TRAIN_LINE.findall(resumed)]
    assert [step for step, _ in after] == [9, 12], resumed[-3000:]
    assert all(math.isfinite(loss) for loss in before + [loss for _, loss in after])
    assert after[-1][1] < before[0], (before, after)


# ----- bad configurations ------------------------------------------------------------------------
# name: (world size, flags that change VALID, the message's start)
BAD_CONFIGS = {
    "processes_not_tp_x_pp": (
        3,
        "--tensor-model-parallel-size 2",
        "3 processes cannot be split into TP=2 x PP=1; launch a multiple of 2",
    ),
    "heads_vs_tp": (
        2,
        "--tensor-model-parallel-size 2 --num-attention-heads 1",
        "--tensor-model-parallel-size 2 must divide the attention heads (1)",
    ),
    "layers_vs_pp": (
        2,
        "--pipeline-model-parallel-size 2 --num-layers 3",
        "--num-layers 3 is not divisible by --pipeline-model-parallel-size 2",
    ),
    "seq_vs_tp_with_sp": (
        2,
        "--tensor-model-parallel-size 2 --sequence-parallel --seq-length 33",
        "--seq-length 33 must be divisible by TP=2 with --sequence-parallel",
    ),
    "rank_wider_than_layer": (
        1,
        "--lpa-attn-rank 33",
        "LPA rank 33 of the attention (--lpa-attn-rank) query projection (32 -> 32) exceeds its "
        "width 32",
    ),
    "variance_factors_with_pytorch_init": (
        1,
        "--lpa-attn-rank 8 --init-style pytorch --lpa-init variance",
        "--lpa-init variance matches megatron's init; --init-style pytorch initialises the",
    ),
    "global_batch_vs_micro_x_dp": (
        2,
        "--micro-batch-size 4 --global-batch-size 12",
        "--global-batch-size 12 is not a multiple of --micro-batch-size 4 x data-parallel size "
        "2 = 8; use a multiple of 8",
    ),
}


def test_valid_config_parses(monkeypatch):
    """The base of the bad configurations: each of them fails for its one change alone."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = parse_args(VALID + ["--micro-batch-size", "2", "--global-batch-size", "16"])
    assert (cfg.parallel.data_parallel_size, cfg.schedule.num_microbatches) == (4, 2)


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_stops_with_what_to_change(monkeypatch, case):
    world_size, change, message = BAD_CONFIGS[case]
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    with pytest.raises(SystemExit, match=re.escape(f"Configuration error: {message}")):
        parse_args(VALID + change.split())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without a GPU")
def test_cuda_graph_without_a_gpu_says_so(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit, match="--cuda-graph needs a GPU; leave it off on CPU"):
        parse_args(VALID + ["--cuda-graph"])


# name: (data_flags arguments, the message's start)
BAD_DATA = {
    "missing_data_path": (
        {"data_path": "{root}/missing_text_document"},
        "--data-path: no usable dataset at prefix {root}/missing_text_document",
    ),
    "split_without_documents": (
        {"split": "999,1,0"},  # 300 documents: validation gets [300, 300)
        "--split 999,1,0 leaves the valid split documents [300, 300)",
    ),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_stops_before_training(dataset, tmp_path, case):
    arguments, message = BAD_DATA[case]
    arguments = {name: value.format(root=tmp_path) for name, value in arguments.items()}
    with pytest.raises(AssertionError) as failure:
        torchrun(PRETRAIN, 1, *TINY_LPA_RUN, *data_flags(dataset, **arguments))
    output = str(failure.value)
    # The trainer's own check stopped the run, not an exception from inside dataset building.
    expected = f"Configuration error: {message.format(root=tmp_path)}"
    assert re.search(f"^{re.escape(expected)}", output, re.MULTILINE), output
    assert not TRAIN_LINE.search(output)


# ----- YAML --config -----------------------------------------------------------------------------
YAML_RUN = """\
num-layers: 2
hidden_size: 32              # underscores work too
num-attention-heads: 4
seq-length: 32
lr: 1e-3                     # YAML reads this as a string; it must still become a float
train-iters: 5
swiglu: true
lpa-attn-rank: 8
data-path: corpus_text_document
tokenizer-type: GPTSentencePieceTokenizer
"""


def test_yaml_config_sets_options_and_flags_override_it(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = tmp_path / "run.yaml"
    config.write_text(YAML_RUN)
    cfg = parse_args(["--config", str(config)])
    assert (
        cfg.model.num_layers,
        cfg.model.hidden_size,
        cfg.schedule.lr,
        cfg.schedule.train_iters,
    ) == (2, 32, 1e-3, 5)
    assert cfg.model.swiglu and cfg.model.lpa_attn_rank == 8 and not cfg.data.mock_data
    assert cfg.data.data_path == ["corpus_text_document"]  # one prefix, not its characters
    overrides = "--hidden-size 64 --lpa-attn-rank 16 --data-path 0.3 a 0.7 b".split()
    cfg = parse_args(["--config", str(config), *overrides])
    assert (cfg.model.hidden_size, cfg.model.lpa_attn_rank, cfg.model.num_layers) == (64, 16, 2)
    assert cfg.data.data_path == ["0.3", "a", "0.7", "b"]


@pytest.mark.parametrize(
    "line,message",
    [
        (
            "hiden-size: 32",
            ", line {line}: unknown setting 'hiden-size'; did you mean 'hidden-size'?",
        ),
        ("normalization: BatchNorm", ": argument --normalization: invalid choice: 'BatchNorm'"),
        ("num-layers: two", ": argument --num-layers: invalid int value: 'two'"),
        ("swiglu: 'no'", ": swiglu must be true or false, got 'no'"),
    ],
    ids=["unknown_key", "bad_choice", "bad_int", "bad_bool"],
)
def test_yaml_config_error_names_file_and_key(tmp_path, line, message):
    config = tmp_path / "bad.yaml"
    config.write_text(YAML_RUN + line + "\n")
    expected = message.format(line=YAML_RUN.count("\n") + 1)
    with pytest.raises(SystemExit, match=re.escape(f"--config {config}{expected}")):
        parse_args(["--config", str(config)])
