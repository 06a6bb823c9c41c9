"""The scans behind the reader's CSV errors: where the header ends, and the line and column
of the first record pyarrow rejects (checked against files whose answer is known)."""

import gzip

import pytest

from fm_keras.errors import DataError
from fm_keras.line_scan import find_line, first_problem, header_record, not_utf8, record_line


@pytest.mark.parametrize("data, header", [
    (b"a,b\n1,2\n", b"a,b\n"),
    (b"a,b\r\n1,2\r\n", b"a,b\r\n"),
    (b"a,b\r1,2\r", b"a,b\r"),  # classic Mac line ends: pyarrow takes them too
    (b"\n\r\n\xef\xbb\xbfa,b\n1,2\n", b"\n\r\n\xef\xbb\xbfa,b\n"),  # blank lines first
    (b"\xef\xbb\xbf\na,b\n1,2\n", b"\xef\xbb\xbf\na,b\n"),  # a BOM alone is not the header
    (b'"a\nx","b ""q\r\n"\n1,2\n', b'"a\nx","b ""q\r\n"\n'),  # line breaks inside quotes
    (b"a,b", b"a,b"),  # no line end: the file is the header
])
def test_header_record_ends_after_the_first_record(tmp_path, data, header):
    path = tmp_path / "h.csv"
    path.write_bytes(data)
    assert header_record(str(path)) == header


def test_a_header_longer_than_a_read_block_is_read_whole(tmp_path):
    path = tmp_path / "h.csv"
    names = ",".join(f"column_{i}" for i in range(20_000)).encode()  # ~200 KB
    path.write_bytes(names + b"\n" + b"1\n" * 10)
    assert header_record(str(path)) == names + b"\n"


def test_a_header_that_is_not_utf8_names_its_line_and_byte(tmp_path):
    path = tmp_path / "h.csv"
    path.write_bytes(b'\n"a\nb",caf\xe9\n1,2\n')
    with pytest.raises(DataError, match=r"h.csv: line 3: not UTF-8 \(byte 0xe9 in the header\); "
                                        "re-encode the file as UTF-8"):
        header_record(str(path))


@pytest.mark.parametrize("data, columns, problem", [
    (b"a,b\n1,2\n", ["a", "b"], None),
    (b'a,b\n1,"x\ny"\n\n2,caf\xe9\n', ["a", "b"],
     "line 5: not UTF-8 (byte 0xe9 at column 'b'); re-encode the file as UTF-8"),
    # the byte's own line inside a quoted multi-line cell
    (b'a,b\n1,"x\ny\xffz"\n', ["b"], "line 3: not UTF-8 (byte 0xff at column 'b')"),
    # a column that is not read is not checked (pyarrow does not convert it)
    (b"a,b\n1,caf\xe9\n2,3,4\n", ["a"], "line 3: 3 fields where the header has 2 ('2,3,4'"),
    (b"\xef\xbb\xbfa,b\r\n1,2\r\n3\r\n", ["a", "b"], "line 3: 1 fields where the header has 2"),
    # a record cut short whose bytes are not UTF-8: the byte is named (pyarrow's invalid-row
    # callback could not decode this row)
    (b"a,b\n1,2\n\xff3", ["a", "b"], "line 3: not UTF-8 (byte 0xff at column 'a')"),
    # a NUL byte (NumPy drops a trailing one: '82\x00' and '82' collided in a vocabulary),
    # in a read column only, on its own line of a multi-line cell
    (b'a,b\n1,"x\n82\x00"\n', ["b"], "line 3: a NUL byte in column 'b'; remove it"),
    (b"a,b\n1\x00,2\n", ["b"], None),
])
def test_first_problem_names_the_line_and_column(tmp_path, data, columns, problem):
    path = tmp_path / "f.csv"
    path.write_bytes(data)
    got = first_problem(str(path), columns)
    assert got == problem if problem is None else got.startswith(problem), got


def test_find_line_and_not_utf8(tmp_path):
    path = tmp_path / "f.txt"
    path.write_bytes(b"ok\nstill ok \xc3\xa9\nbad \xe9 here\n")
    assert find_line(str(path), not_utf8) == (3, 0xE9)
    assert find_line(str(path), lambda text: b"\x1f" in text) is None


def test_record_line_counts_blank_lines_and_quoted_line_breaks(tmp_path):
    # The A/B errors named a data row 0-based ("row 3" for line 5); pyarrow skips the blank
    # lines and reads the quoted line break as one row, so the line is found by a scan.
    path = tmp_path / "e.csv"
    path.write_bytes(b'\n"a",b\r\n1,2\n\n"x\ny",3\n4,5\n')
    assert [record_line(str(path), row) for row in range(4)] == [3, 5, 7, None]
    assert record_line(str(tmp_path / "missing.csv"), 0) is None


@pytest.mark.parametrize("data, message", [
    # `evaluate --data ok.csv.gz` said "not UTF-8 (byte 0x8b in the header) ... iconv -f latin1"
    pytest.param(gzip.compress(b"user_id,click\n1,0\n", mtime=0),
                 "the file is gzip-compressed; decompress it first, e.g. gunzip", id="gzip"),
    pytest.param("user_id,click\n1,0\n".encode("utf-16"),
                 "the file is UTF-16; re-encode it as UTF-8, e.g. iconv -f utf-16 -t utf-8",
                 id="utf-16"),
    pytest.param(b"\xfe\xff" + "user_id,click\n".encode("utf-16-be"),
                 "the file is UTF-16; re-encode it as UTF-8, e.g. iconv -f utf-16 -t utf-8",
                 id="utf-16-be"),
    pytest.param("user_id,click\n1,0\n".encode("utf-32"),
                 "the file is UTF-32; re-encode it as UTF-8, e.g. iconv -f utf-32 -t utf-8",
                 id="utf-32"),
])  # ids: pytest-xdist needs the same test names in every worker (gzip stamps its mtime)
def test_gzip_and_utf16_files_get_their_own_fix(tmp_path, data, message):
    path = tmp_path / "ok.csv.gz"
    path.write_bytes(data)
    with pytest.raises(DataError) as info:
        header_record(str(path))
    assert str(info.value) == f"{path}: {message}"
