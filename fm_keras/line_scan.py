"""Scans of a text file's lines in Python, for what pyarrow's CSV reader does not say.

`fm_keras.reading` reads CSV with pyarrow and installs no invalid-row callback (pyarrow
decodes the row before calling it: a row that is not UTF-8 made Python print "Exception
ignored ... UnicodeDecodeError"). So it asks this module where a CSV header ends
(`header_record`: the header is parsed without reading a row) and, when pyarrow rejects a file,
which line and column it stopped at (`first_problem`): pyarrow names no line once fields may
hold line breaks, and no column in a parse error.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterator, Sequence

from fm_keras.errors import DataError

REENCODE = "re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8"
_HEADER_READ_BYTES = 1 << 16
_LINE_END = re.compile(rb"\r\n?|\n")
_BOM = b"\xef\xbb\xbf"
_UNDECODED = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, read as surrogateescape
_NUL = re.compile("\x00")
_GZIP = b"\x1f\x8b"
# UTF-32 first: its little-endian mark starts with UTF-16's
_UTF16_32_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
                  (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))
REMOVE_NUL = "remove it"


def header_record(path: str) -> bytes:
    """The bytes of a CSV file from its start to the end of its first record (the header;
    blank lines before it included), read in blocks of 64 KiB until it ends.

    Raises:
        DataError: the file is gzip-compressed, UTF-16 or UTF-32 (by its magic number or
            byte-order mark: `not_text`), or the header is not UTF-8 (naming the line and
            byte), with the fix.
        OSError: the file cannot be read.
    """
    head, end = b"", None
    with open(path, "rb") as f:
        while end is None:
            more = f.read(_HEADER_READ_BYTES)
            head += more
            end = _first_record_end(head, final=not more)
    head = head[:end]
    encoding = not_text(head)
    if encoding:
        raise DataError(f"{path}: {encoding}")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        line = len(_LINE_END.findall(head, 0, err.start)) + 1
        raise DataError(f"{path}: line {line}: not UTF-8 (byte 0x{head[err.start]:02x} in the "
                        f"header); {REENCODE}") from None
    return head


def not_text(head: bytes) -> str | None:
    """What a file that starts with `head` is when it is not UTF-8 text that a byte-order mark
    or magic number tells (gzip, UTF-16, UTF-32), with the fix; else None. The generic "not
    UTF-8 (byte 0x8b) ... iconv -f latin1" hint was wrong for these."""
    if head.startswith(_GZIP):
        return "the file is gzip-compressed; decompress it first, e.g. gunzip"
    for bom, name in _UTF16_32_BOMS:
        if head.startswith(bom):
            return (f"the file is {name}; re-encode it as UTF-8, e.g. iconv -f {name.lower()} "
                    "-t utf-8")
    return None


def _first_record_end(head: bytes, final: bool) -> int | None:
    """Where the first record of a CSV file that starts with `head` ends: after the first line
    end outside quotes (an even number of ``"`` before it, RFC 4180) that follows text; blank
    lines (and the byte-order mark) before it do not count. None: not within `head` (read
    more), unless `final` (the file ends there)."""
    quotes, last, text = 0, 0, False
    for match in _LINE_END.finditer(head):
        line = head[last:match.start()]
        quotes += line.count(b'"')
        text = text or bool(line.removeprefix(_BOM) if last == 0 else line)
        last = match.end()
        if text and quotes % 2 == 0:
            return last
    return len(head) if final else None


def first_problem(path: str, columns: Sequence[str]) -> str | None:
    """The first problem of a CSV file that pyarrow's reader stops at.

    The file is read with Python's `csv` module (the same RFC 4180 rules; bytes that are not
    UTF-8 kept as surrogates) for the first record after the header that holds such a byte or
    a NUL byte in one of `columns`, or has another number of fields than the header. Called on
    errors only: it is a pass in Python.

    Args:
        path: a CSV file.
        columns: the columns read (pyarrow checks only their cells for UTF-8).

    Returns:
        ``"line N: not UTF-8 (byte 0xff at column 'c'); re-encode ..."`` or ``"line N: a NUL
        byte in column 'c'; remove it"`` (N: the line of the byte) or ``"line N: 2 fields
        where the header has 3 (...)"`` (N: the record's first line), or None when the scan
        finds none (the caller gives pyarrow's message).
    """
    header = None
    wanted: set[int] = set()
    try:
        for first, record in _numbered_records(path):
            if header is None:
                header = [record[0].removeprefix("\ufeff"), *record[1:]]
                wanted = {i for i, name in enumerate(header) if name in columns}
                continue
            problem = _record_problem(record, first, header, wanted)
            if problem:
                return problem
    except (csv.Error, OSError):
        return None
    return None


def record_line(path: str, row: int) -> int | None:
    """The line of a CSV file on which its data row `row` starts, as `fm_keras.reading` counts
    rows (0-based, the header not counted; blank lines skipped; a quoted field may span lines).

    A pass in Python (`csv`, as `first_problem`): for error messages only.

    Args:
        path: a CSV file.
        row: the 0-based data row, e.g. the index of a frame read by ``data.read_frame``.

    Returns:
        The 1-based line number, or None when the file has no such row or cannot be read.
    """
    try:  # the header is record -1
        for seen, (first, _) in enumerate(_numbered_records(path), start=-1):
            if seen == row:
                return first
    except (csv.Error, OSError):
        return None
    return None


def _numbered_records(path: str) -> Iterator[tuple[int, list[str]]]:
    """The records of a CSV file (Python's `csv`), each with the 1-based line it starts on;
    blank lines are skipped, as pyarrow skips them. Raises what `open` and `csv` raise."""
    line = 1  # the first line of the next record
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        records = csv.reader(f)
        for record in records:
            first, line = line, records.line_num + 1
            if record:
                yield first, record


def _record_problem(record: list[str], line: int, header: list[str],
                    wanted: set[int]) -> str | None:
    """`first_problem`'s check of one record that starts at `line`."""
    for i, cell in enumerate(record):
        bad = _UNDECODED.search(cell) or _NUL.search(cell) if i in wanted else None
        if bad:
            at = line + sum(c.count("\n") for c in record[:i]) + cell.count("\n", 0, bad.start())
            if bad.group() == "\x00":
                return f"line {at}: a NUL byte in column {header[i]!r}; {REMOVE_NUL}"
            byte = ord(bad.group()) - 0xDC00
            return (f"line {at}: not UTF-8 (byte 0x{byte:02x} at column {header[i]!r}); "
                    f"{REENCODE}")
    if len(record) != len(header):
        text = ",".join(record).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        text = text if len(text) <= 80 else text[:77] + "..."
        return (f"line {line}: {len(record)} fields where the header has {len(header)} "
                f"({text!r}; a field holding the delimiter or a line break must be quoted "
                "with \"\")")
    return None


def find_line(path: str, matches: Callable[[bytes], object]
              ) -> tuple[int, object] | None:
    """The first (line number, what `matches` returned) of the file's lines (bytes) for which
    `matches` is truthy, or None."""
    with open(path, "rb") as f:
        for number, text in enumerate(f, start=1):
            found = matches(text)
            if found:
                return number, found
    return None


def not_utf8(text: bytes) -> int | None:
    """The first byte of `text` that is not UTF-8 (as an int), or None."""
    try:
        text.decode("utf-8")
        return None
    except UnicodeDecodeError as err:
        return text[err.start]
