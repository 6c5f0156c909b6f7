"""Checksums of a checkpoint's files: recorded when it is saved, checked before it is loaded.

Each ``iter_*`` directory holds ``checksums.json``::

    {"algorithm": "sha256", "files": {"__0_0.distcp": {"bytes": 755646, "sha256": "9f2c..."}, ...}}

with every file of the checkpoint (paths relative to the directory). The ranks share the work:
rank ``r`` of ``w`` hashes files ``r, r + w, r + 2w, ...`` of the sorted list; the directory is on
a filesystem every rank sees, as dist_checkpointing requires. Every function here is a collective
call when ``torch.distributed`` is initialised, and works in a lone process without it.

SHA-256, not BLAKE2b: hashlib's SHA-256 runs on the CPU's SHA instructions (x86 SHA-NI, ARMv8
crypto extensions) and hashed 1.05 GB/s per core against BLAKE2b's 0.44-0.58 GB/s on the
2-core CPU of BENCHMARKS.md. A rank hashes its files in parallel threads (hashlib releases the GIL),
one per core it has to itself.
"""

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist

MANIFEST = "checksums.json"
ALGORITHM = "sha256"
_READ_BYTES = 4 << 20


def file_digest(path: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB pieces."""
    digest = hashlib.new(ALGORITHM)
    buffer = bytearray(_READ_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while read := f.readinto(buffer):
            digest.update(view[:read])
    return digest.hexdigest()


def checksums(directory: Path) -> dict:
    """The manifest of every file under ``directory``, on every rank.

    Raises:
        OSError: a file could not be read (on every rank, naming it).
    """
    names = _share(_broadcast(sorted(_files(directory)) if _rank() == 0 else None))
    entries = {}
    for part in _all_gather(dict(zip(names, _in_threads(_entry, directory, names)))):
        entries.update(part)
    unreadable = sorted(entry for entry in entries.values() if isinstance(entry, str))
    if unreadable:
        raise OSError(f"cannot hash the checkpoint's files: {'; '.join(unreadable)}")
    return {"algorithm": ALGORITHM, "files": dict(sorted(entries.items()))}


def write_manifest(directory: Path, manifest: dict) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def find_damage(directory: Path) -> Optional[list]:
    """What differs from the manifest, one line per file (empty: intact); None without a manifest.

    Every rank gets the same answer.
    """
    files = _broadcast(_read_manifest(directory) if _rank() == 0 else None)
    if files is None:
        return None
    if isinstance(files, str):
        return [files]
    names = _share(sorted(files))
    problems = _in_threads(lambda d, name: _problem(d, name, files[name]), directory, names)
    return sorted(problem for part in _all_gather(problems) for problem in part if problem)


def _entry(directory: Path, name: str):
    """A file's manifest entry, or why it could not be read."""
    try:
        return {
            "bytes": os.path.getsize(directory / name),
            ALGORITHM: file_digest(directory / name),
        }
    except OSError as error:
        return f"{directory / name}: {error}"


def _read_manifest(directory: Path):
    """The manifest's ``files``, None when there is none, or why it cannot be used (a str)."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if manifest["algorithm"] != ALGORITHM:
            return f"{path}: checksums made with {manifest['algorithm']!r}, not {ALGORITHM!r}"
        files = manifest["files"]
        for entry in files.values():
            if not (isinstance(entry["bytes"], int) and isinstance(entry[ALGORITHM], str)):
                raise ValueError(f"malformed entry {entry!r}")
        return files
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        return f"{path} is not a readable checksum list ({type(error).__name__}: {error})"


def _problem(directory: Path, name: str, expected: dict) -> Optional[str]:
    found = _entry(directory, name)
    if isinstance(found, str):
        return found
    if found["bytes"] != expected["bytes"]:
        return f"{directory / name} has {found['bytes']} bytes, {expected['bytes']} when saved"
    if found[ALGORITHM] != expected[ALGORITHM]:
        return f"{directory / name}: its {ALGORITHM} differs from the one recorded when saved"
    return None


def _files(directory: Path) -> list:
    return [
        str(path.relative_to(directory))
        for path in directory.rglob("*")
        if path.is_file() and path.name != MANIFEST
    ]


def _in_threads(work: Callable, directory: Path, names: list) -> list:
    """``[work(directory, name) for name in names]``, the files in parallel threads."""
    # One thread per core this rank has to itself: torchrun's ranks of a node share its cores.
    cores = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    with ThreadPoolExecutor(max(1, min(cores, len(names)))) as pool:
        return list(pool.map(lambda name: work(directory, name), names))


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _share(names: list) -> list:
    world = dist.get_world_size() if dist.is_initialized() else 1
    return names[_rank() :: world]


def _broadcast(value):
    """Rank 0's ``value`` on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(value) -> list:
    if not dist.is_initialized():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered
