"""Rewrites the golden loss curves: ``python -m tests.golden.regenerate [RUN ...]`` (all by
default), from the repository root. Commit the JSON files it changes, and say in the commit why
the curves moved."""

import sys

from tests.golden.runs import RUNS, golden_file, train, write


def main(names) -> None:
    unknown = [name for name in names if name not in RUNS]
    if unknown:
        raise SystemExit(f"unknown golden runs {unknown}; the runs are {list(RUNS)}")
    for name in names or RUNS:
        write(name, train(name))
        print(f"wrote {golden_file(name)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
