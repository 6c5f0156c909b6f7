"""Training datasets: Megatron-LM's ``--data-path`` blends -> megatron-core GPTDatasets.

Everything is checked before megatron-core sees it: dataset files exist and are intact, blend
weights are well formed, and no split with a share of the data comes out empty (megatron-core's
GPTDataset would loop forever building it instead of failing).
"""

import glob
import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megatron_lpa.data.indexed_format import bin_path, idx_path
from megatron_lpa.data.indexed_reader import IndexedDatasetError, IndexedDatasetReader
from megatron_lpa.platform import megatron_patches
from megatron_lpa.tokenizers import Tokenizer

SPLIT_NAMES = ("train", "valid", "test")

# A blend: dataset prefixes, and their weights (None: weight by size).
Blend = tuple[list[str], list[float] | None]


class DataConfigError(ValueError):
    """The data flags are inconsistent or point at missing data; the message names the flag."""


@dataclass
class DataConfig:
    """Where training data comes from; fields are named after Megatron-LM's flags.

    Attributes:
        data_path: ``--data-path``: one prefix, several prefixes (weighted by size), or
            weight-prefix pairs ``["0.3", "a", "0.7", "b"]``; items may hold several
            space-separated values. Divided by ``split``.
        split: ``--split``: train,valid,test proportions of each ``data_path`` dataset.
        train_data_path: ``--train-data-path``, same syntax, used whole for training
            (instead of ``data_path``).
        valid_data_path: ``--valid-data-path``.
        test_data_path: ``--test-data-path``.
        data_cache_path: ``--data-cache-path``: where sample indices are cached; next to the
            data when None.
        seq_length: ``--seq-length``, tokens per sample; required.
        seed: ``--seed``, for document and sample shuffling.
        reset_position_ids: Restart position ids after each end-of-document token.
        reset_attention_mask: Keep attention within documents.
        eod_mask_loss: No loss on end-of-document tokens.
        create_attention_mask: Build attention masks in the dataset (needed only for
            ``reset_attention_mask``; the model is causal without one).
    """

    data_path: list[str] | None = None
    split: str = "969,30,1"
    train_data_path: list[str] | None = None
    valid_data_path: list[str] | None = None
    test_data_path: list[str] | None = None
    data_cache_path: str | None = None
    seq_length: int | None = None
    seed: int = 1234
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    create_attention_mask: bool = True


def _as_weight(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_data_path(values: Sequence[str], flag: str = "--data-path") -> Blend:
    """Parses Megatron's data path syntax: ``prefix ...`` or ``weight prefix weight prefix ...``.

    Raises:
        DataConfigError: Empty, weights without prefixes (or the reverse), or a weight that is
            not a finite number > 0.
    """
    items = [item for value in values for item in value.split()]
    if not items:
        raise DataConfigError(f"{flag} is empty; pass a dataset prefix or weight-prefix pairs")
    weights = [_as_weight(item) for item in items[0::2]]
    if len(items) % 2 == 0 and all(w is not None for w in weights):
        bad = [text for text, w in zip(items[0::2], weights) if not (math.isfinite(w) and w > 0)]
        if bad:
            raise DataConfigError(
                f"{flag}: blend weights must be finite numbers > 0, got {', '.join(bad)} in "
                f"{' '.join(items)}; give each prefix a positive weight like 0.3"
            )
        return items[1::2], weights
    if weights[0] is not None:
        raise DataConfigError(
            f"{flag} {' '.join(items)}: weights and prefixes must alternate, "
            "like '0.3 data/a_text_document 0.7 data/b_text_document'"
        )
    return items, None


def _open_dataset(prefix: str, flag: str) -> IndexedDatasetReader:
    """Opens a dataset, or raises an error that says what to pass instead."""
    try:
        return IndexedDatasetReader(prefix)
    except IndexedDatasetError as error:
        hint = ""
        if prefix.endswith((".bin", ".idx")):
            hint = f"; pass the prefix without the extension: {prefix[:-4]}"
        else:
            made = sorted(glob.glob(idx_path(glob.escape(prefix) + "_*_document")))
            if made:
                hint = f"; did you mean {made[0][:-4]}? (preprocess_data.py adds _<key>_document)"
        raise DataConfigError(
            f"{flag}: no usable dataset at prefix {prefix} ({error}; expected "
            f"{bin_path(prefix)} and {idx_path(prefix)} from tools/preprocess_data.py){hint}"
        ) from error


def _split_blends(config: DataConfig) -> list[tuple[str, Blend] | None]:
    """The (flag, blend) each split is drawn from, None for a split without data."""
    per_split = [config.train_data_path, config.valid_data_path, config.test_data_path]
    if config.data_path and any(per_split):
        raise DataConfigError(
            "pass either --data-path (divided by --split) or --train-data-path/--valid-data-path/"
            "--test-data-path, not both"
        )
    if config.data_path:
        blend = parse_data_path(config.data_path)
        return [("--data-path", blend)] * len(SPLIT_NAMES)
    if not any(per_split):
        raise DataConfigError(
            "no training data: pass --data-path (a prefix from tools/preprocess_data.py, or "
            "weight-prefix pairs) or --train-data-path"
        )
    return [
        (f"--{name}-data-path", parse_data_path(paths, f"--{name}-data-path")) if paths else None
        for name, paths in zip(SPLIT_NAMES, per_split)
    ]


def _empty_split_message(
    config: DataConfig, name: str, flag: str, dataset: IndexedDatasetReader, begin: int, end: int
) -> str:
    hang = (
        f"megatron-core would hang building the {name} split (even when no {name} samples are "
        "requested)"
    )
    if not config.data_path:
        return f"{flag} {dataset.path_prefix} holds no tokens; {hang}. Pass one with documents."
    shares = [float(share) for share in re.findall(r"[.0-9]+", config.split)]
    shares += [0.0] * (len(SPLIT_NAMES) - len(shares))
    shares[SPLIT_NAMES.index(name)] = 0.0
    without = ",".join(f"{share:g}" for share in shares)
    return (
        f"--split {config.split} leaves the {name} split documents [{begin}, {end}) of the "
        f"{dataset.num_sequences} in {flag} {dataset.path_prefix}, which hold no tokens; {hang}. "
        f"Give {name} a larger share of --split, add documents, or give it no share "
        f"(--split {without})."
    )


def validate_data_config(config: DataConfig) -> list[Blend | None]:
    """Checks the data flags against the files; returns each split's blend (None: no data).

    With ``data_path``, a split of share 0 in ``split`` gets no dataset, as in megatron-core.

    Raises:
        DataConfigError: Missing or damaged datasets, malformed flags, or a split with a share
            (or its own path) whose documents hold no tokens.
    """
    if config.seq_length is None or config.seq_length <= 0:
        raise DataConfigError(f"--seq-length must be a positive number, got {config.seq_length}")
    split_blends = _split_blends(config)
    split_matrix = [(0.0, 1.0)] * len(SPLIT_NAMES)
    if config.data_path:
        try:
            split_matrix = convert_split_vector_to_split_matrix(
                parse_and_normalize_split(config.split)
            )
        except (AssertionError, ValueError, ZeroDivisionError) as error:
            raise DataConfigError(
                f"--split {config.split!r} is not three non-negative proportions like 969,30,1"
            ) from error
    readers: dict[str, IndexedDatasetReader] = {}
    for index, name in enumerate(SPLIT_NAMES):
        if split_blends[index] is None or split_matrix[index] is None:
            continue
        flag, (prefixes, _) = split_blends[index]
        for prefix in prefixes:
            if prefix not in readers:
                readers[prefix] = _open_dataset(prefix, flag)
            dataset = readers[prefix]
            begin, end = (
                int(round(bound * dataset.num_sequences)) for bound in split_matrix[index]
            )
            if dataset.sequence_lengths[begin:end].sum(dtype="int64") == 0:
                raise DataConfigError(_empty_split_message(config, name, flag, dataset, begin, end))
    return [None if entry is None else entry[1] for entry in split_blends]


def check_token_ids(config: DataConfig, vocab_size: int, sample: int = 1 << 20) -> None:
    """Checks that the datasets hold no token id >= ``vocab_size`` (the tokenizer's).

    Looks at each dataset's first and last ``sample`` tokens: data tokenized with a larger
    vocabulary shows ids beyond it almost at once, and the training batches are checked too.

    Raises:
        DataConfigError: A dataset holds a larger id; the message names its prefix and flag.
    """
    for entry in _split_blends(config):
        if entry is None:
            continue
        flag, (prefixes, _) = entry
        for prefix in prefixes:
            largest = _open_dataset(prefix, flag).largest_token_id(sample)
            if largest >= vocab_size:
                raise DataConfigError(
                    f"{flag} {prefix} holds token id {largest}, but the tokenizer has only "
                    f"{vocab_size} ids: the data was made with another tokenizer. Preprocess it "
                    "with this one, or train with the --tokenizer-type and --tokenizer-model it "
                    "was preprocessed with."
                )


def build_train_valid_test_datasets(
    config: DataConfig,
    tokenizer: Tokenizer,
    train_valid_test_num_samples: Sequence[int | None],
    is_built_on_rank: Callable[[], bool] | None = None,
) -> tuple:
    """Builds megatron-core GPTDatasets (or blends of them) for train, valid and test.

    Works in a single process and under ``torch.distributed`` (every rank must call it; rank
    0 builds the cached indices first).

    Args:
        config: The data flags.
        tokenizer: Supplies ``eod`` and ``pad`` for masks, and identifies the data in caches.
        train_valid_test_num_samples: Samples wanted from each split; None builds one epoch.
        is_built_on_rank: Whether this rank needs the datasets (megatron-core's callback);
            every rank by default.

    Returns:
        (train, valid, test); an entry is None when its split has no data.

    Raises:
        DataConfigError: See ``validate_data_config``.
    """
    if len(train_valid_test_num_samples) != len(SPLIT_NAMES):
        raise ValueError("train_valid_test_num_samples needs three entries: train, valid, test")
    blends = validate_data_config(config)
    gpt_config = GPTDatasetConfig(
        random_seed=config.seed,
        sequence_length=config.seq_length,
        blend=blends[0] if config.data_path else None,
        blend_per_split=None if config.data_path else blends,
        split=config.split if config.data_path else None,
        path_to_cache=config.data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=config.reset_position_ids,
        reset_attention_mask=config.reset_attention_mask,
        eod_mask_loss=config.eod_mask_loss,
        create_attention_mask=config.create_attention_mask,
    )
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset,
        list(train_valid_test_num_samples),
        is_built_on_rank or (lambda: True),
        gpt_config,
    )
    with megatron_patches.rank_zero_without_process_group():
        train, valid, test = builder.build()
    return train, valid, test
