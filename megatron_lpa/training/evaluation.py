"""A language model's loss, perplexity and bits per byte: one code path for training's validation
and for ``tools/evaluate.py``.

A forward step reports, per micro-batch, ``[loss sum (nats), predicted tokens, their bytes]``;
sums of those over micro-batches and data-parallel ranks give the token-mean loss, its perplexity
and ``bits per byte = loss sum / ln 2 / bytes``. Bytes are the UTF-8 bytes each target token
stands for (``Tokenizer.token_bytes``), so bits per byte compares models with different
tokenizers; without a tokenizer (mock data) it is not reported.
"""

import math
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch.utils.data import Dataset

from megatron_lpa.data.indexed_reader import IndexedDatasetReader
from megatron_lpa.data.json_documents import JsonDocumentParser, iter_documents
from megatron_lpa.platform.distributed import device_type

JSON_SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.gz", ".jsonl.xz", ".json")


def _loss_func(loss_mask: torch.Tensor, target_bytes: Optional[torch.Tensor], output: torch.Tensor):
    """Token-sum loss of a micro-batch; reports (sum, tokens, bytes) so means over steps are
    exact."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = (output.float().reshape(-1) * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    byte_count = (
        (target_bytes.reshape(-1).float() * mask).sum()
        if target_bytes is not None
        else torch.zeros((), device=mask.device)
    )
    report = torch.stack([loss_sum.detach().clone(), mask.sum(), byte_count])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model, token_bytes: Optional[torch.Tensor] = None):
    """megatron's forward-step contract: (per-token losses ``[b, s]``, loss function).

    ``token_bytes`` (``[vocab]`` on the device) turns the labels into byte counts for bits per
    byte; bind it with ``functools.partial``.
    """
    batch = next(data_iterator)
    device = device_type()
    tokens, labels, loss_mask, positions = (
        batch[key].to(device, non_blocking=True)
        for key in ("tokens", "labels", "loss_mask", "position_ids")
    )
    attention_mask = batch.get("attention_mask")
    if attention_mask is not None:
        attention_mask = attention_mask.to(device, non_blocking=True)
    output = model(tokens, positions, attention_mask, labels=labels)  # [b, s] losses
    target_bytes = token_bytes[labels] if token_bytes is not None else None
    return output, partial(_loss_func, loss_mask, target_bytes)


def reduce_reports(reports: list) -> torch.Tensor:
    """``[loss sum, tokens, bytes]`` over micro-batches and DP ranks (zeros off the last stage)."""
    if not reports:
        return torch.zeros(3, device=device_type())
    total = torch.stack([r["lm loss"] for r in reports]).sum(0)
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return total


@dataclass
class LossTotals:
    """Sums over an evaluation: nats, predicted tokens, their UTF-8 bytes."""

    nats: float
    tokens: float
    bytes: float

    @classmethod
    def of(cls, total: torch.Tensor) -> "LossTotals":
        nats, tokens, byte_count = total.tolist()
        return cls(nats, tokens, byte_count)

    @property
    def loss(self) -> float:
        return self.nats / self.tokens if self.tokens > 0 else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 20.0))

    @property
    def bits_per_byte(self) -> Optional[float]:
        return self.nats / math.log(2) / self.bytes if self.bytes > 0 else None

    def as_dict(self) -> dict:
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "tokens": int(self.tokens),
            "bytes": int(self.bytes),
        }


def token_bytes_on_device(tokenizer, vocab_size: int) -> Optional[torch.Tensor]:
    """``[vocab_size]`` bytes per id (the padded rows count none), or None without a tokenizer."""
    if tokenizer is None:
        return None
    table = np.zeros(vocab_size, dtype=np.int64)
    per_id = tokenizer.token_bytes()
    table[: len(per_id)] = per_id
    return torch.from_numpy(table).to(device_type())


def token_stream(source: str, tokenizer, json_key: str = "text") -> np.ndarray:
    """The tokens of a dataset, documents back to back, each followed by the end-of-document id.

    ``source`` is a JSON-lines file (``.jsonl``, optionally ``.zst/.gz/.xz``; its ``json_key``
    texts are tokenized here) or the prefix of an indexed dataset (``.bin/.idx``, tokenized with
    ``--append-eod`` by ``tools/preprocess_data.py``, read as it is).
    """
    if source.endswith(JSON_SUFFIXES):
        parser = JsonDocumentParser([json_key])
        ids = []
        for texts in iter_documents([source], parser):
            for document in tokenizer.tokenize_batch(texts):
                ids += document + [tokenizer.eod]
        return np.asarray(ids, dtype=np.int64)
    return IndexedDatasetReader(source).tokens()


class SequentialWindows(Dataset):
    """A token stream cut into consecutive samples, each token a target exactly once.

    Sample ``i`` reads tokens ``i*s .. (i+1)*s`` and predicts ``i*s+1 .. (i+1)*s+1``, so every
    token but the stream's first is predicted once; the last sample is padded with masked
    positions. Items are dicts of ``[s]`` tensors as the GPT datasets give them.
    """

    def __init__(self, stream: np.ndarray, seq_length: int, pad_id: int = 0):
        self.stream, self.seq_length, self.pad_id = stream, seq_length, pad_id

    def __len__(self) -> int:
        return max(0, math.ceil((len(self.stream) - 1) / self.seq_length))

    def __getitem__(self, index: int) -> dict:
        s = self.seq_length
        window = torch.from_numpy(self.stream[index * s : (index + 1) * s + 1].astype(np.int64))
        valid = len(window) - 1
        padded = torch.full((s + 1,), self.pad_id, dtype=torch.int64)
        padded[: len(window)] = window
        loss_mask = torch.zeros(s)
        loss_mask[:valid] = 1.0
        return {
            "tokens": padded[:-1],
            "labels": padded[1:],
            "loss_mask": loss_mask,
            "position_ids": torch.arange(s),
        }


class PaddedDataset(Dataset):
    """``dataset`` followed by fully masked copies of its first item, up to ``length`` items, so
    that every sample of an evaluation fills whole micro-batches on every data-parallel rank."""

    def __init__(self, dataset: Dataset, length: int):
        self.dataset, self.length = dataset, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if index < len(self.dataset):
            return self.dataset[index]
        item = dict(self.dataset[0])
        item["loss_mask"] = torch.zeros_like(item["loss_mask"])
        return item


def evaluate(run_schedule, iterator: Iterator, steps: int) -> LossTotals:
    """Sums ``steps`` forward-only steps of ``run_schedule(iterator)`` (megatron's schedule over
    the model chunks, returning the loss functions' reports)."""
    total = torch.zeros(3, device=device_type())
    for _ in range(steps):
        total += reduce_reports(run_schedule(iterator))
    return LossTotals.of(total)
