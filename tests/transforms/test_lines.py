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


def read_in_blocks(data: bytes, block_bytes: int, lines_per_batch: int) -> list[list[bytes]]:
    batches = []
    for _, start, end in split_ranges("signals.jsonl", len(data), block_bytes):
        batches += read_range(io.BytesIO(data), start, end, lines_per_batch)
    return batches


# Lines built from the bytes that matter at a boundary: newlines, carriage returns and one ordinary byte.
_CONTENT = st.lists(st.sampled_from([b"\n", b"\r", b"\r\n", b"a", b"{}"]), max_size=40).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(_CONTENT, st.integers(1, 50), st.integers(1, 4))
def test_every_line_is_read_once_in_order_whatever_the_block_size(data, block_bytes, lines_per_batch):
    batches = read_in_blocks(data, block_bytes, lines_per_batch)
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
        assert [line for batch in read_in_blocks(data, block_bytes, 2) for line in batch] == expected


def test_a_compressed_file_is_one_range_read_whole():
    assert split_ranges("gs://bucket/signals.jsonl.gz", 10_000, 100) == [("gs://bucket/signals.jsonl.gz", 0, None)]
    data = b'{"a": 1}\r\n\n{"b": 2}'
    batches = list(read_range(io.BytesIO(data), 0, None, 1000))
    assert batches == [lines_of(data)]


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
