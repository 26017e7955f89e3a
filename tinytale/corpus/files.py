"""Stories out of the user's files: text, JSON Lines and Parquet, plain or compressed.

Every reader streams (a line or a Parquet batch at a time), so a corpus of several GB never
sits in memory, and every story comes out with its whitespace folded to single spaces: the
same stories give the same text whichever format carried them. A file that cannot give
stories raises `CorpusError` naming the file, the line or row, and the fix.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tinytale.errors import UserError

ENDOFTEXT = "<|endoftext|>"
AUTO, BLANK_LINE = "auto", "blank_line"
TEXT_SUFFIXES = (".txt", ".text")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSED_SUFFIXES = (".gz", ".zst")
# How far `auto` looks for an `<|endoftext|>` line: TinyStories' stories are about 1 KB each.
SNIFF_BYTES = 1 << 20
PARQUET_BATCH_ROWS = 8192


class CorpusError(UserError):
    """A corpus that cannot be read or is unusable; the message names the file and the fix."""


@dataclass(frozen=True)
class StoryFormat:
    """How files are cut into stories: the text files' separator, the JSON/Parquet field."""

    separator: str = AUTO
    text_field: str = "text"

    def cache_key(self) -> str:
        return json.dumps([self.separator, self.text_field])


def _inner_suffix(path: Path) -> str:
    """`tales.jsonl.gz` -> `.jsonl`: the format under the compression."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def is_corpus_file(path: Path) -> bool:
    """Whether a file in a corpus folder is read (others, like a README.md, are skipped)."""
    inner = _inner_suffix(path)
    if path.suffix.lower() in COMPRESSED_SUFFIXES:
        return inner in TEXT_SUFFIXES + JSON_SUFFIXES
    return inner in TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES


def _first_sentence(exc: BaseException) -> str:
    """A library's message cut to its first sentence, to keep ours one sentence long."""
    return str(exc).split(". ")[0].strip().rstrip(".") or type(exc).__name__


def fold(text: str) -> str:
    """One story as one line: whitespace runs (paragraph breaks included) become a space."""
    return " ".join(text.split())


def stream_file(file: Path, fmt: StoryFormat) -> Iterator[str]:
    """The stories of one file, in order; CorpusError for an unreadable or empty one."""
    inner = _inner_suffix(file)
    if inner in PARQUET_SUFFIXES and file.suffix.lower() in COMPRESSED_SUFFIXES:
        raise CorpusError(f"data.corpus file '{file}' is a compressed Parquet file; Parquet "
                          "compresses inside the file, so decompress it first.")
    reader = _parquet_stories if inner in PARQUET_SUFFIXES else (
        _json_stories if inner in JSON_SUFFIXES else _text_stories)
    count = 0
    try:
        for story in reader(file, fmt):
            count += 1
            yield story
    except OSError as exc:
        # gzip and zstandard report a damaged stream as OSError / EOFError subclasses.
        what = exc.strerror or str(exc) or type(exc).__name__
        raise CorpusError(f"data.corpus file '{file}' cannot be read ({what}); check the file "
                          "and its permissions, or download it again.") from None
    except EOFError:
        raise CorpusError(f"data.corpus file '{file}' ends early (truncated compressed data); "
                          "download or compress it again.") from None
    if count == 0:
        raise CorpusError(f"data.corpus file '{file}' holds no stories; fill it or remove it "
                          "from the corpus.")


@contextlib.contextmanager
def _open_binary(file: Path) -> Iterator[IO[bytes]]:
    """The file's bytes, decompressed on the fly for .gz and .zst."""
    suffix = file.suffix.lower()
    if suffix == ".gz":
        with gzip.open(file, "rb") as f:
            yield f
    elif suffix == ".zst":
        with open(file, "rb") as raw:
            yield io.BufferedReader(_ZstdReader(raw, file), buffer_size=1 << 20)
    else:
        with open(file, "rb") as f:
            yield f


class _ZstdReader(io.RawIOBase):
    """Decompressed bytes of a .zst file, frame after frame; EOFError when it is cut off
    (zstandard's own stream reader returns a truncated frame as if it were whole)."""

    def __init__(self, raw: IO[bytes], file: Path):
        try:
            import zstandard
        except ImportError:
            raise CorpusError(f"data.corpus file '{file}' is zstd-compressed, which needs the "
                              "zstandard package; run pip install 'tinytale[zst]' or "
                              "decompress the file.") from None

        self._zstd, self._raw, self._file = zstandard, raw, file
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._pending, self._offset = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._offset >= len(self._pending):
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if not self._frame.eof:
                    raise EOFError("truncated zstd frame")
                return 0
            try:
                self._pending, self._offset = self._decompress(chunk), 0
            except self._zstd.ZstdError as exc:
                raise CorpusError(f"data.corpus file '{self._file}' is not valid zstd data "
                                  f"({_first_sentence(exc)}); download or compress it "
                                  "again.") from None
        n = min(len(buffer), len(self._pending) - self._offset)
        buffer[:n] = self._pending[self._offset:self._offset + n]
        self._offset += n
        return n

    def _decompress(self, chunk: bytes) -> bytes:
        out = self._frame.decompress(chunk)
        while self._frame.eof and self._frame.unused_data:  # the next frame starts here
            rest = self._frame.unused_data
            self._frame = self._zstd.ZstdDecompressor().decompressobj()
            out += self._frame.decompress(rest)
        return out


def _lines(file: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line, decoded one at a time so errors name the line."""
    try:
        with _open_binary(file) as f:
            for number, raw in enumerate(f, 1):
                if b"\0" in raw:
                    raise CorpusError(f"data.corpus file '{file}' looks binary (NUL byte on "
                                      f"line {number}); give a text, JSON Lines or Parquet "
                                      "file.")
                try:
                    yield number, raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise CorpusError(f"data.corpus file '{file}' is not UTF-8 text (bad byte "
                                      f"on line {number}, column {exc.start + 1}); convert it "
                                      "to UTF-8.") from None
    except gzip.BadGzipFile as exc:
        raise CorpusError(f"data.corpus file '{file}' is not valid gzip data "
                          f"({_first_sentence(exc)}); "
                          "download or compress it again.") from None


def _separator_of(file: Path, fmt: StoryFormat) -> str | None:
    """The marker line between stories, or None for blank lines (see data.story_separator)."""
    if fmt.separator == BLANK_LINE:
        return None
    if fmt.separator != AUTO:
        return fmt.separator
    seen = 0
    for _, line in _lines(file):
        if ENDOFTEXT in line:  # on a line of its own, or glued to a story's last words
            return ENDOFTEXT
        seen += len(line)
        if seen > SNIFF_BYTES:
            break
    return None


def _text_stories(file: Path, fmt: StoryFormat) -> Iterator[str]:
    """Stories end at a separator (TinyStories' `<|endoftext|>`, inner newlines are
    paragraphs; anywhere in a line) or, without one, at blank lines."""
    separator = _separator_of(file, fmt)
    story: list[str] = []
    for _, line in _lines(file):
        if separator is None:
            if line.strip():
                story.append(line)
            elif story:
                yield fold(" ".join(story))
                story = []
            continue
        if separator in line:
            *ends, line = line.split(separator)
            for piece in ends:
                story.append(piece)
                if text := fold(" ".join(story)):
                    yield text
                story = []
        story.append(line)
    if text := fold(" ".join(story)):
        yield text


def _json_stories(file: Path, fmt: StoryFormat) -> Iterator[str]:
    """One JSON object per line (JSON Lines, as Hugging Face datasets write .json too)."""
    field = fmt.text_field
    for number, line in _lines(file):
        if not line.strip():
            continue
        where = f"data.corpus file '{file}' line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            hint = (" (a JSON array: write one object per line instead)"
                    if number == 1 and line.lstrip().startswith("[") else "")
            raise CorpusError(f"{where} is not valid JSON ({exc.msg} at column {exc.colno})"
                              f"{hint}; fix or remove "
                              "that line.") from None
        if not isinstance(record, dict):
            raise CorpusError(f"{where} is a JSON {type(record).__name__}, not an object; "
                              f"give one object with a '{field}' field per line.")
        if field not in record:
            keys = ", ".join(sorted(record)[:8]) or "none"
            raise CorpusError(f"{where} has no '{field}' field (it has: {keys}); set "
                              "data.text_field to the field that holds the story.")
        text = record[field]
        if not isinstance(text, str):
            raise CorpusError(f"{where}: field '{field}' holds {type(text).__name__}, not a "
                              "string; give the story as a JSON string or choose another "
                              "data.text_field.")
        if story := fold(text):
            yield story


def _parquet_stories(file: Path, fmt: StoryFormat) -> Iterator[str]:
    """The text column, a batch of rows at a time: the file is never in memory whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    field = fmt.text_field
    try:
        parquet = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(f"data.corpus file '{file}' is not a readable Parquet file "
                          f"({_first_sentence(exc)}); "
                          "download or write it again.") from None
    schema = parquet.schema_arrow
    if field not in schema.names:
        raise CorpusError(f"data.corpus file '{file}' has no '{field}' column (it has: "
                          f"{', '.join(schema.names[:8])}); set data.text_field to the column "
                          "that holds the stories.")
    column_type = schema.field(field).type
    is_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow 16+
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)
            or is_view(column_type)):
        raise CorpusError(f"data.corpus file '{file}' column '{field}' holds {column_type}, "
                          "not strings; choose the text column with data.text_field.")
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
            for text in batch.column(0).to_pylist():
                if text is None:
                    raise CorpusError(f"data.corpus file '{file}' row {row} has no '{field}' "
                                      "(null); drop that row or fill it.")
                row += 1
                if story := fold(text):
                    yield story
    except pa.ArrowException as exc:
        raise CorpusError(f"data.corpus file '{file}' is damaged after row {row} "
                          f"({_first_sentence(exc)}); "
                          "download or write it again.") from None
