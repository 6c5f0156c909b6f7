"""JSON lines -> documents: the texts of the requested keys, the Pile subset filter, and for
each line that is not a document, the reason."""

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

from megatron_lpa.data.jsonl_reader import LineBlock, iter_line_blocks

try:
    from orjson import loads as json_loads

    HAVE_ORJSON = True
except ImportError:
    from json import loads as json_loads

    HAVE_ORJSON = False

_JSON_TYPE_NAMES = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    type(None): "null",
}


class BadLineError(ValueError):
    """A line that cannot become a document; the message says why and what to check."""


@dataclass(frozen=True)
class BadLine:
    """A line (or the rest of a file) that was not turned into a document."""

    path: str
    line_number: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line_number}: {self.reason}"


def _json_type(value: object) -> str:
    return _JSON_TYPE_NAMES.get(type(value), "number")


@dataclass
class ParsedBlock:
    """The lines of a LineBlock, sorted out.

    Attributes:
        documents: Each document's texts, one per JSON key.
        line_numbers: Each document's line number.
        bad_lines: Lines that are not documents, and why (with a file's read error last).
        filtered_lines: Lines the Pile filter dropped.
    """

    documents: list[list[str]] = field(default_factory=list)
    line_numbers: list[int] = field(default_factory=list)
    bad_lines: list[BadLine] = field(default_factory=list)
    filtered_lines: int = 0


class JsonDocumentParser:
    """Parses JSON lines into documents, optionally keeping only some Pile subsets.

    Args:
        json_keys: Keys whose string values are the texts (``--json-keys``).
        pile_set_names: Keep only lines whose ``meta.pile_set_name`` is one of these.
        exclude_pile_set_names: Drop lines whose ``meta.pile_set_name`` is one of these.
    """

    def __init__(
        self,
        json_keys: Iterable[str],
        pile_set_names: Iterable[str] | None = None,
        exclude_pile_set_names: Iterable[str] | None = None,
    ) -> None:
        self.json_keys = tuple(json_keys)
        self._include = frozenset(pile_set_names) if pile_set_names else None
        self._exclude = frozenset(exclude_pile_set_names or ())

    def parse_block(self, block: LineBlock) -> ParsedBlock:
        """Parses every line of a block; problems are collected, not raised."""
        parsed = ParsedBlock()
        for number, line in enumerate(block.lines(), start=block.first_line):
            try:
                texts = self.parse(line)
            except BadLineError as error:
                parsed.bad_lines.append(BadLine(block.path, number, str(error)))
                continue
            if texts is None:
                parsed.filtered_lines += 1
            else:
                parsed.documents.append(texts)
                parsed.line_numbers.append(number)
        if block.error is not None:
            parsed.bad_lines.append(BadLine(block.path, block.first_line, block.error))
        return parsed

    def parse(self, line: bytes) -> list[str] | None:
        """Returns the line's texts, one per key, or None when the Pile filter drops it.

        Raises:
            BadLineError: Not valid UTF-8 or JSON, not an object, a key missing or not a
                string, or no ``meta.pile_set_name`` while filtering on it.
        """
        if not line.strip():
            raise BadLineError("blank line; each line must hold one JSON object")
        try:
            record = json_loads(line)
        except ValueError as error:
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as bad_bytes:
                raise BadLineError(
                    f"not valid UTF-8 (byte {bad_bytes.start}: "
                    f"{line[bad_bytes.start : bad_bytes.start + 4]!r}...)"
                ) from None
            raise BadLineError(f"not valid JSON ({error})") from None
        if not isinstance(record, dict):
            raise BadLineError(f"a JSON {_json_type(record)}, not an object")
        if self._include is not None or self._exclude:
            meta = record.get("meta")
            name = meta.get("pile_set_name") if isinstance(meta, dict) else None
            if not isinstance(name, str):
                raise BadLineError(
                    "no meta.pile_set_name to filter on "
                    "(--pile-set-names / --exclude-pile-set-names)"
                )
            if name in self._exclude or (self._include is not None and name not in self._include):
                return None
        texts = []
        for key in self.json_keys:
            if key not in record:
                present = ", ".join(map(repr, list(record)[:8]))
                raise BadLineError(f"no key {key!r} (keys: {present}); check --json-keys")
            text = record[key]
            if not isinstance(text, str):
                raise BadLineError(f"{key!r} is a JSON {_json_type(text)}, not a string")
            if not HAVE_ORJSON and not text.isascii():
                # json (unlike orjson) accepts "\ud800" escapes: strings no UTF-8 can hold.
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise BadLineError(f"{key!r} holds an unpaired surrogate escape") from None
            texts.append(text)
        return texts


def iter_documents(
    paths: Sequence[str], parser: JsonDocumentParser, bad_lines: list[BadLine] | None = None
) -> Iterator[list[str]]:
    """Yields the texts of each document of the files, in order, in one process.

    Args:
        paths: Input files.
        parser: What to extract from each line.
        bad_lines: None to stop at the first bad line (BadLineError naming file and line);
            a list to collect bad lines in and go on.
    """
    for block in iter_line_blocks(paths):
        parsed = parser.parse_block(block)
        if parsed.bad_lines and bad_lines is None:
            raise BadLineError(f"{parsed.bad_lines[0]}; pass --skip-bad-lines to skip such lines")
        if bad_lines is not None:
            bad_lines += parsed.bad_lines
        yield from parsed.documents
