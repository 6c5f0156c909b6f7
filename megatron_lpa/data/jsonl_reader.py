"""Streams JSON-lines files (plain, ``.zst``, ``.gz``, ``.xz``) as blocks of whole lines.

Files are read in chunks and never loaded whole. Each block knows its file and the number of
its first line, so a problem found later can name both. A file that is unreadable, corrupt or
truncated ends in an error block at the line reached, after every whole line before the cut;
a truncated ``.zst`` is caught too, although zstandard's stream reader would end there without
complaint.
"""

import glob
import lzma
import os
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Sequence

import zstandard

READ_SIZE = 1 << 20


class InputError(Exception):
    """An input file is missing, unreadable, corrupt or cut short."""


@dataclass(frozen=True)
class LineBlock:
    """Whole lines of one input file.

    Attributes:
        path: The file.
        first_line: 1-based number of the block's first line in the file.
        data: The lines, each ending in a newline except possibly the file's last.
        file_offset: Bytes of the file on disk (compressed, for compressed files) read so far.
        error: Why the file could not be read on from ``first_line`` (then ``data`` is empty
            and the file's blocks end here).
    """

    path: str
    first_line: int
    data: bytes
    file_offset: int
    error: str | None = None

    def lines(self) -> list[bytes]:
        """The block's lines, without their newlines."""
        lines = self.data.split(b"\n")
        if not lines[-1]:
            lines.pop()
        return lines


def expand_input_paths(patterns: Sequence[str]) -> list[str]:
    """Expands ``--input`` values (files or glob patterns) into files, in order, once each.

    Raises:
        InputError: A value matches no file, or names a directory.
    """
    paths: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not os.path.exists(matches[0]):
            raise InputError(f"--input {pattern}: no such file")
        for path in matches:
            if os.path.isdir(path):
                raise InputError(
                    f"--input {path} is a directory; pass files or a glob like {path}/*.jsonl.zst"
                )
            if path not in paths:
                paths.append(path)
    return paths


class _CountingReader:
    """Counts the bytes read from a file, for progress; unlike tell(), this works on pipes."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.bytes_read += len(data)
        return data


def _new_decompressor(path: str):
    """A decompressor for one frame (zstd) or member (gzip) or stream (xz), or None."""
    if path.endswith(".zst"):
        return zstandard.ZstdDecompressor().decompressobj()
    if path.endswith(".gz"):
        return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    if path.endswith(".xz"):
        return lzma.LZMADecompressor()
    return None


def _stream_chunks(raw: _CountingReader, path: str) -> Iterator[bytes]:
    """Decompresses ``raw`` chunk by chunk, every frame of it, yielding all that comes before a
    cut (gzip's and lzma's file readers would drop the last read's data); EOFError at the cut."""
    decompressor = _new_decompressor(path)
    if decompressor is None:
        while chunk := raw.read(READ_SIZE):
            yield chunk
        return
    frame_started = False
    while chunk := raw.read(READ_SIZE // 4):
        while chunk:
            frame_started = True
            if data := decompressor.decompress(chunk):
                yield data
            chunk = b""
            if decompressor.eof:  # the rest of the chunk, if any, starts the next frame
                chunk = decompressor.unused_data
                decompressor, frame_started = _new_decompressor(path), False
    if frame_started:
        raise EOFError("the compressed data ends part-way through")


def read_chunks(path: str) -> Iterator[tuple[bytes, int]]:
    """Yields the decompressed bytes of a file in chunks, with the on-disk offset reached.

    Raises:
        InputError: The file cannot be opened or read, or is not valid compressed data.
    """
    try:
        with open(path, "rb") as f:
            raw = _CountingReader(f)
            for chunk in _stream_chunks(raw, path):
                yield chunk, raw.bytes_read
    except EOFError as error:
        raise InputError(f"file is truncated ({error}); re-download or re-create it") from error
    except (OSError, lzma.LZMAError, zlib.error, zstandard.ZstdError) as error:
        raise InputError(f"cannot read the file: {error}") from error


def iter_line_blocks(paths: Sequence[str]) -> Iterator[LineBlock]:
    """Yields the lines of the files in order, in blocks of about 1 MiB of whole lines.

    A file that fails part way ends with an error block at the line it reached; the partial
    line before the failure is dropped and the next file follows.
    """
    for path in paths:
        line_number, carry, offset = 1, b"", 0
        try:
            for chunk, offset in read_chunks(path):
                data = carry + chunk
                end = data.rfind(b"\n") + 1
                carry = data[end:]
                if end:
                    yield LineBlock(path, line_number, data[:end], offset)
                    line_number += data.count(b"\n", 0, end)
        except InputError as error:
            yield LineBlock(path, line_number, b"", offset, error=str(error))
            continue
        if carry:
            yield LineBlock(path, line_number, carry, offset)
