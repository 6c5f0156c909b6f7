"""The tools run as scripts, and an interrupted preprocessing run leaves no dataset behind."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from megatron_lpa.data.indexed_reader import IndexedDatasetReader
from tests.data.conftest import REPO, make_documents, write_jsonl

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")


def _tool(name: str, *args) -> list[str]:
    return [sys.executable, str(REPO / "tools" / f"{name}.py"), *map(str, args)]


def test_train_tokenizer_then_preprocess_then_merge_as_scripts(tmp_path):
    records = [{"text": t} for t in make_documents(300, seed=7)]
    source = write_jsonl(tmp_path / "c.jsonl.zst", records, "zst")

    def run(*cmd):
        return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)

    trained = run(
        *_tool(
            "train_tokenizer",
            "--input",
            source,
            "--model-prefix",
            tmp_path / "tok",
            "--vocab-size",
            400,
            "--num-threads",
            1,
        )
    )
    assert trained.returncode == 0, trained.stderr
    preprocess = [
        "--tokenizer-type",
        "GPTSentencePieceTokenizer",
        "--tokenizer-model",
        tmp_path / "tok.model",
    ]
    for half, part in enumerate((records[:150], records[150:])):
        shard = write_jsonl(tmp_path / f"s{half}.jsonl", part)
        done = run(
            *_tool(
                "preprocess_data",
                "--input",
                shard,
                "--output-prefix",
                tmp_path / f"s{half}",
                "--append-eod",
                "--workers",
                2,
                *preprocess,
            )
        )
        assert done.returncode == 0, done.stderr
    merged = run(
        *_tool(
            "merge_datasets",
            "--input",
            tmp_path / "s0_text_document",
            tmp_path / "s1_text_document",
            "--output-prefix",
            tmp_path / "all",
        )
    )
    assert merged.returncode == 0, merged.stderr
    assert IndexedDatasetReader(str(tmp_path / "all")).num_documents == 300

    write_jsonl(tmp_path / "bad.jsonl", records[:3] + [b"{oops"])
    failed = run(
        *_tool(
            "train_tokenizer",
            "--input",
            tmp_path / "bad.jsonl",
            "--model-prefix",
            tmp_path / "bad",
            "--vocab-size",
            100,
        )
    )
    assert failed.returncode == 1 and "bad.jsonl:4: not valid JSON" in failed.stderr
    assert not list(tmp_path.glob("bad.model"))


@pytest.mark.parametrize(
    "signal_number",
    [signal.SIGINT, signal.SIGTERM, signal.SIGKILL],
    ids=["SIGINT", "SIGTERM", "SIGKILL"],
)
def test_interrupted_run_leaves_no_dataset(tmp_path, sp_model, signal_number):
    tokenizer = ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", sp_model]
    prefix = tmp_path / "out"
    earlier = write_jsonl(tmp_path / "earlier.jsonl", [{"text": "an earlier finished run"}])
    subprocess.run(
        _tool("preprocess_data", "--input", earlier, "--output-prefix", prefix, *tokenizer),
        env=ENV,
        check=True,
        capture_output=True,
        timeout=120,
    )
    finished = {
        p: (tmp_path / p).read_bytes() for p in ("out_text_document.bin", "out_text_document.idx")
    }

    # Input through a pipe that is never closed: the run cannot finish on its own, and is
    # killed once it has written tokens to its temporary files.
    fifo = tmp_path / "endless.jsonl"
    os.mkfifo(fifo)
    data = b"".join(json.dumps({"text": t}).encode() + b"\n" for t in make_documents(20, seed=8))
    data *= 4000  # about 13 MB: more than the blocks the run keeps in flight

    def feed():
        try:
            with open(fifo, "wb") as pipe:
                pipe.write(data)
                time.sleep(60)
        except BrokenPipeError:
            pass

    threading.Thread(target=feed, daemon=True).start()
    run = subprocess.Popen(
        _tool(
            "preprocess_data",
            "--input",
            fifo,
            "--output-prefix",
            prefix,
            "--workers",
            2,
            *tokenizer,
        ),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    partial = tmp_path / "out_text_document.bin.tmp"
    try:
        deadline = time.time() + 60
        while not (partial.exists() and partial.stat().st_size > 0):
            assert run.poll() is None and time.time() < deadline, run.communicate()
            time.sleep(0.05)
        os.kill(run.pid, signal_number)
        _, stderr = run.communicate(timeout=30)
        assert run.returncode != 0
        # The earlier finished dataset is untouched; nothing else looks finished.
        assert {p: (tmp_path / p).read_bytes() for p in finished} == finished
        assert not [
            p for p in tmp_path.iterdir() if p.suffix in (".bin", ".idx") and p.name not in finished
        ]
        if signal_number == signal.SIGKILL:
            # The workers notice that their parent is gone and exit too.
            deadline = time.time() + 10
            while time.time() < deadline:
                try:
                    os.killpg(run.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                pytest.fail("worker processes outlived the killed run")
        else:
            assert "interrupted; no output was written" in stderr
            assert not list(tmp_path.glob("*.tmp"))
    finally:
        try:
            os.killpg(run.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.fault
@pytest.mark.skipif(sys.platform != "linux", reason="holds a forked worker in C (Linux's libc)")
def test_a_worker_that_starts_late_does_not_hang_the_exit(tmp_path, sp_model):
    """The pool is stopped (SIGTERM to its workers) while a worker is still between fork and its
    initializer: that worker used to run the tool's KeyboardInterrupt handler in its copy of the
    tool, print "interrupted; no output was written" over a complete output, and could hang."""
    source = write_jsonl(tmp_path / "one.jsonl", [{"text": "a document for the first worker"}])
    prefix = tmp_path / "out"
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "tests" / "data" / "late_worker_start.py"),
            *_tool(
                "preprocess_data",
                "--input",
                source,
                "--output-prefix",
                prefix,
                "--workers",
                2,
                "--tokenizer-type",
                "GPTSentencePieceTokenizer",
                "--tokenizer-model",
                sp_model,
            )[1:],
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
    )
    assert run.returncode == 0 and "interrupted" not in run.stderr, run.stderr
    assert IndexedDatasetReader(str(tmp_path / "out_text_document")).num_documents == 1
