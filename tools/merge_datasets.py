"""Merges indexed datasets (.bin/.idx pairs) into one, documents in input order.

Example:
    python tools/merge_datasets.py --input data/shard00_text_document data/shard01_text_document \\
        --output-prefix data/all_text_document
    python tools/merge_datasets.py --input data/shards/ --output-prefix data/all_text_document
"""

import argparse
import os
import sys

from megatron_lpa.data.indexed_format import bin_path
from megatron_lpa.data.indexed_reader import IndexedDatasetError
from megatron_lpa.data.indexed_writer import merge_indexed_datasets


def input_prefixes(values: list[str]) -> list[str]:
    """Dataset prefixes of ``--input``: prefixes as given, and each directory's datasets
    (every ``*.idx`` with its ``.bin``, sorted by name, as Megatron-LM's merge tool does)."""
    prefixes = []
    for value in values:
        if not os.path.isdir(value):
            prefixes.append(value)
            continue
        found = sorted(
            os.path.join(value, name[:-4])
            for name in os.listdir(value)
            if name.endswith(".idx") and os.path.exists(bin_path(os.path.join(value, name[:-4])))
        )
        if not found:
            raise IndexedDatasetError(f"--input {value} holds no .bin/.idx pairs")
        prefixes += found
    return prefixes


def main(argv: list[str] | None = None) -> int:
    """Runs the tool; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--input", nargs="+", required=True, help="dataset prefixes, or directories of datasets"
    )
    parser.add_argument("--output-prefix", required=True, help="merged dataset, without suffix")
    args = parser.parse_args(argv)
    try:
        prefixes = input_prefixes(args.input)
        if args.output_prefix in prefixes:
            raise IndexedDatasetError("--output-prefix must differ from every --input dataset")
        merged = merge_indexed_datasets(prefixes, args.output_prefix)
    except IndexedDatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"merged {len(prefixes)} datasets: {merged.document_count:,} documents, "
        f"{merged.token_count:,} tokens -> {args.output_prefix}.bin/.idx"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
