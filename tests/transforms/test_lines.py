"""Block reads give exactly the lines ReadFromText gives: each once, whatever the block size."""

import gzip
import io

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import given, settings
from hypothesis import strategies as st

from transforms.lines import ReadLineBlocks, read_range, split_ranges


def lines_of(data: bytes) -> list[bytes]:
    """The lines of ``data`` as ReadFromText documents them: split at \\n, a \\r before it dropped, and a last
    line without a newline kept. The pipeline test below checks ReadFromText agrees on the tricky files."""
    *ended, last = data.split(b"\n")
    return [line[:-1] if line.endswith(b"\r") else line for line in ended] + ([last] if last else [])


def read_in_blocks(data: bytes, block_bytes: int, lines_per_batch: int, read_bytes: int = 3) -> list[list[bytes]]:
    batches = []
    for _, start, end in split_ranges("signals.jsonl", len(data), block_bytes):
        batches += read_range(io.BytesIO(data), start, end, lines_per_batch, read_bytes)
    return batches


# Lines built from the bytes that matter at a boundary: newlines, carriage returns and one ordinary byte.
_CONTENT = st.lists(st.sampled_from([b"\n", b"\r", b"\r\n", b"a", b"{}"]), max_size=40).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(_CONTENT, st.integers(1, 50), st.integers(1, 4), st.integers(1, 12))
def test_every_line_is_read_once_in_order_whatever_the_block_size(data, block_bytes, lines_per_batch, read_bytes):
    batches = read_in_blocks(data, block_bytes, lines_per_batch, read_bytes)
    assert [line for batch in batches for line in batch] == lines_of(data)
    assert all(0 < len(batch) <= lines_per_batch for batch in batches)


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"", []),
        (b"\n", [b""]),
        (b"a", [b"a"]),
        (b"a\n", [b"a"]),
        (b"a\r\nb\r\n", [b"a", b"b"]),
        (b"a\rb\n", [b"a\rb"]),  # a lone \r is part of the line
        (b"a\r", [b"a\r"]),  # and so is one at the very end, with no newline after it
        (b"a\n\n\nb", [b"a", b"", b"", b"b"]),
    ],
)
def test_the_tricky_endings(data, expected):
    assert lines_of(data) == expected  # the reference itself, on cases written out by hand
    for block_bytes in range(1, len(data) + 2):
        for read_bytes in (1, 2, 1 << 20):
            batches = read_in_blocks(data, block_bytes, 2, read_bytes)
            assert [line for batch in batches for line in batch] == expected


class _ObjectReader:
    """A reader with only ``read`` and ``seek``, counting reads: what a Cloud Storage handle offers cheaply (its
    ``readline`` falls back to a ``read(1)`` per byte), so reading must not depend on ``readline``."""

    def __init__(self, data: bytes):
        self._data, self._at, self.reads = data, 0, 0

    def seek(self, offset: int) -> None:
        self._at = offset

    def read(self, n: int) -> bytes:
        self.reads += 1
        chunk = self._data[self._at : self._at + n]
        self._at += len(chunk)
        return chunk


def test_a_range_takes_a_few_large_reads_not_one_per_byte():
    data = b"".join(b'{"event_id": "e%d", "pad": "%s"}\n' % (i, b"x" * (i % 40)) for i in range(2000))
    handle = _ObjectReader(data)
    start, end = 1000, len(data) // 2
    lines = [line for batch in read_range(handle, start, end, 100, read_bytes=4096) for line in batch]
    # The lines starting in [start, end): the ones after the line holding byte start - 1, up to end.
    offsets = [0]
    for line in data.split(b"\n")[:-1]:
        offsets.append(offsets[-1] + len(line) + 1)
    expected = [data[a : b - 1] for a, b in zip(offsets, offsets[1:], strict=False) if start <= a < end]
    assert lines == expected
    assert handle.reads <= (end - start) // 4096 + 3


def test_a_compressed_file_is_one_range_read_whole():
    assert split_ranges("gs://bucket/signals.jsonl.gz", 10_000, 100) == [("gs://bucket/signals.jsonl.gz", 0, None)]
    data = b'{"a": 1}\r\n\n{"b": 2}'
    batches = list(read_range(io.BytesIO(data), 0, None, 1000))
    assert batches == [lines_of(data)]
    assert split_ranges("signals.JSONL.GZ", 10_000, 100) == [("signals.JSONL.GZ", 0, None)]  # as ReadFromText reads it


_FILES = {
    "crlf.jsonl": b'{"a": 1}\r\n{"b": 2}\r\n',
    "blank_lines.jsonl": b"\n\nx\n\n",
    "no_final_newline.jsonl": b"first\nsecond\rstill second\nlast\r",
    "empty.jsonl": b"",
    "long.jsonl": b"".join(b"line %d %s\n" % (i, b"x" * (i % 17)) for i in range(300)),
}


def test_the_pipeline_reads_what_read_from_text_reads(tmp_path):
    for name, data in _FILES.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "packed.jsonl.gz").write_bytes(gzip.compress(_FILES["long.jsonl"] + b"tail"))
    expected = [line for data in _FILES.values() for line in lines_of(data)]
    expected += lines_of(_FILES["long.jsonl"] + b"tail")
    pattern = str(tmp_path / "*.jsonl*")
    with TestPipeline() as p:
        blocks = p | "Blocks" >> ReadLineBlocks(pattern, block_bytes=7, lines_per_batch=3)
        text = p | "Text" >> beam.io.ReadFromText(pattern, coder=beam.coders.BytesCoder())
        assert_that(blocks, equal_to(expected), label="BlocksAsExpected")
        assert_that(text, equal_to(expected), label="TextAsExpected")


def test_a_pattern_matching_nothing_fails(tmp_path):
    with pytest.raises(Exception, match="Empty match for pattern"):
        with TestPipeline() as p:
            _ = p | ReadLineBlocks(str(tmp_path / "missing.jsonl"))
