"""Datasets and per-rank micro-batch iterators for training, validation and test.

Samples are laid out Megatron-LM's way: a step consumes ``global_batch_size`` consecutive samples;
each micro-step takes ``micro_batch_size * DP`` of them and data-parallel rank ``i`` gets the
``i``-th ``micro_batch_size`` slice. The position in the data is therefore just the number of
consumed samples, which the checkpoint stores, so a resumed run reads exactly what the original
would have. Every TP rank and pipeline stage reads its own identical copy (memory-mapped), which
needs no broadcast.
"""

from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from megatron_lpa.config.training_config import TrainingConfig
from megatron_lpa.data.gpt_datasets import (
    DataConfig,
    DataConfigError,
    build_train_valid_test_datasets,
    check_token_ids,
    validate_data_config,
)


class MockGPTDataset(Dataset):
    """Random tokens, a fixed function of (seed, index): for benchmarks and smoke tests."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int):
        self.num_samples, self.seq_length = num_samples, seq_length
        self.vocab_size, self.seed = vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        tokens = torch.randint(0, self.vocab_size, (self.seq_length + 1,), generator=generator)
        return {
            "tokens": tokens[:-1],
            "labels": tokens[1:],
            "loss_mask": torch.ones(self.seq_length),
            "position_ids": torch.arange(self.seq_length),
        }


class MicroBatchSampler:
    """Index lists of this data-parallel rank's micro-batches, from ``consumed_samples`` on."""

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
    ):
        self.total, self.consumed = total_samples, consumed_samples
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __iter__(self) -> Iterator[list]:
        step = self.micro_batch_size * self.dp_size
        start = self.consumed
        while start + step <= self.total:
            first = start + self.dp_rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))
            start += step

    def __len__(self) -> int:
        return max(0, (self.total - self.consumed) // (self.micro_batch_size * self.dp_size))


def split_sample_counts(cfg: TrainingConfig) -> list:
    """Samples each split must provide over the whole run: [train, valid, test]."""
    evaluations = (
        cfg.schedule.train_iters // cfg.evaluation.eval_interval + 1
        if cfg.evaluation.eval_iters
        else 0
    )
    return [
        cfg.schedule.train_iters * cfg.schedule.global_batch_size,
        evaluations * cfg.evaluation.eval_iters * cfg.schedule.global_batch_size,
        cfg.evaluation.eval_iters * cfg.schedule.global_batch_size,
    ]


def data_config(cfg: TrainingConfig) -> DataConfig:
    """The run's data flags as the data package's ``DataConfig``."""
    return DataConfig(
        data_path=cfg.data.data_path,
        split=cfg.data.split,
        train_data_path=cfg.data.train_data_path,
        valid_data_path=cfg.data.valid_data_path,
        test_data_path=cfg.data.test_data_path,
        data_cache_path=cfg.data.data_cache_path,
        seq_length=cfg.model.seq_length,
        seed=cfg.run.seed,
        reset_position_ids=cfg.data.reset_position_ids,
        reset_attention_mask=cfg.data.reset_attention_mask,
        eod_mask_loss=cfg.data.eod_mask_loss,
        # Without document masking attention is plainly causal: no mask lets SDPA use flash kernels.
        create_attention_mask=cfg.data.reset_attention_mask,
    )


def check_data(cfg: TrainingConfig) -> None:
    """Stops with what to change when a data flag names no dataset or a split has no documents.

    Runs before any process group or model exists, so a typo costs seconds, not a model build.
    """
    if cfg.data.mock_data:
        return
    try:
        validate_data_config(data_config(cfg))
    except DataConfigError as error:
        raise SystemExit(f"Configuration error: {error}") from None


def check_data_vocabulary(cfg: TrainingConfig, tokenizer) -> None:
    """Stops with what to change when the data holds token ids the tokenizer does not have;
    before the model is built (an id past the embedding table would fail deep inside it)."""
    if cfg.data.mock_data:
        return
    try:
        check_token_ids(data_config(cfg), tokenizer.vocab_size)
    except DataConfigError as error:
        raise SystemExit(f"Configuration error: {error}") from None


def build_datasets(cfg: TrainingConfig, tokenizer, vocab_size: int) -> list:
    """[train, valid, test] datasets (an entry is None when that split has no data)."""
    counts = split_sample_counts(cfg)
    if cfg.data.mock_data:
        return [
            MockGPTDataset(n, cfg.model.seq_length, vocab_size, cfg.run.seed + split) if n else None
            for split, n in enumerate(counts)
        ]
    return list(build_train_valid_test_datasets(data_config(cfg), tokenizer, counts))


def micro_batches(
    dataset: Optional[Dataset],
    consumed_samples: int,
    cfg: TrainingConfig,
    dp_rank: int,
    vocab_size: int,
) -> Optional[Iterator[dict]]:
    """An endless-enough iterator of this rank's micro-batches (dicts of ``[b, s]`` tensors);
    it stops the run at a token id of ``vocab_size`` or more (the model's vocabulary)."""
    if dataset is None:
        return None
    sampler = MicroBatchSampler(
        len(dataset),
        consumed_samples,
        cfg.schedule.micro_batch_size,
        dp_rank,
        cfg.parallel.data_parallel_size,
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=cfg.data.num_workers > 0,
    )
    # Starting workers draws their seed from the global generator; keep it out of the training
    # stream so that a resumed run (which builds its iterators after restoring RNG) stays exact.
    with torch.random.fork_rng(devices=[]):
        batches = iter(loader)
    return _within_vocabulary(batches, vocab_size)


def _within_vocabulary(batches: Iterator[dict], vocab_size: int) -> Iterator[dict]:
    # On the host, before the batch reaches the device: an id past the embedding table is an
    # IndexError on CPU and a device-side assert on GPU, neither of which names the data.
    for batch in batches:
        largest = int(max(batch["tokens"].max(), batch["labels"].max()))
        if largest >= vocab_size:
            raise SystemExit(
                f"Data error: a batch holds token id {largest}, but the model's vocabulary has "
                f"{vocab_size} ids: the data was made with another tokenizer. Preprocess it "
                "with this one, or train with the tokenizer it was preprocessed with."
            )
        yield batch
