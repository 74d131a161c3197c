"""Lines of text files, read in blocks: what ``ReadFromText`` gives a backtest, for less per line.

``beam.io.ReadFromText`` reads each line through its own buffer-and-search
loop in Python, with a range-tracker claim and a timestamp per line: about
7% of a 1M-signal backtest's busy worker time (py-spy, two workers), and a
third of a bare pipeline's (benchmarks/README.md, change 18).
``ReadLineBlocks`` splits each file into byte ranges, reads a range in
1 MiB chunks that ``bytes.split`` cuts into lines, and yields the lines as
Beam batches (lists). A consumer that takes elements gets them one at a
time (Beam unpacks the lists); the backtest's parse step takes the lists
whole (``transforms.parse.ParseSignalBatchFn``, change 19).

The lines are the ones ``ReadFromText(coder=BytesCoder())`` yields: split at
``\\n``, one ``\\r`` before it dropped, a last line without a newline kept,
and an empty file giving nothing (a test compares the two on the same files).
A line belongs to the range holding its first byte, so every line is read
exactly once whatever the block size. Compressed files (by extension, as
``ReadFromText`` detects them) cannot be read from the middle and are read
whole, as one range.

What it does not do that ``ReadFromText`` does: split work dynamically while
a range is being read (Dataflow's liquid sharding). Ranges are fixed at
``block_bytes``, 8 MiB by default, about 30,000 signals, so a large input
still has many more ranges than workers.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.fileio import EmptyMatchTreatment
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

BLOCK_BYTES = 8 << 20  # bytes of file per range: the unit of parallelism
# Lines per batch handed downstream. Beam sizes every batch a step yields by encoding a sample of its
# elements, a fifth of the batch up to 100 (``ListBatchConverter.estimate_byte_size``): the parse step's
# signals are pickled for it. At 1,000 lines a batch that was one signal in ten, 2.7% of a 1M backtest's
# busy worker samples; at 10,000, one in a hundred, 0.3% (benchmarks/README.md, change 38). A batch is a
# few MB of lines and signals, and a range (BLOCK_BYTES) still holds about three.
LINES_PER_BATCH = 10_000
READ_BYTES = 1 << 20  # bytes per read call


def split_ranges(path: str, size: int, block_bytes: int) -> list[tuple[str, int, int | None]]:
    """(path, start, end) byte ranges covering a file; end None means to the end (a compressed file, read whole)."""
    if CompressionTypes.detect_compression_type(path) != CompressionTypes.UNCOMPRESSED:
        return [(path, 0, None)]
    return [(path, start, min(size, start + block_bytes)) for start in range(0, size, block_bytes)]


def _lines(handle, position: int, read_bytes: int):
    """(file offset, line, ended by a newline) for each line from the handle's position, newline dropped.

    Reads fixed-size chunks and splits them in C, whatever the handle: on
    Cloud Storage, ``FileSystems.open`` gives a reader whose ``readline``
    falls back to one ``read(1)`` call per byte (about 64 µs a line, measured
    by a review), so the handle's own ``readline`` is never used.
    """
    carry = b""
    while chunk := handle.read(read_bytes):
        *complete, carry = (carry + chunk).split(b"\n")
        for line in complete:
            yield position, line, True
            position += len(line) + 1
    if carry:
        yield position, carry, False


def read_range(
    handle, start: int, end: int | None, lines_per_batch: int = LINES_PER_BATCH, read_bytes: int = READ_BYTES
):
    """Yield lists of the lines whose first byte lies in [start, end) of an open binary file (end None: to EOF).

    The line that holds byte ``start - 1`` belongs to the range before, so it
    is skipped: read from ``start - 1``, it is just its own rest (only the
    newline, if the previous range ended exactly at a line's end).
    """
    if start:
        handle.seek(start - 1)
    lines = _lines(handle, max(start - 1, 0), read_bytes)
    if start:
        next(lines, None)
    batch: list[bytes] = []
    for offset, line, ended in lines:
        if end is not None and offset >= end:
            break
        batch.append(line[:-1] if ended and line.endswith(b"\r") else line)
        if len(batch) >= lines_per_batch:
            yield batch
            batch = []
    if batch:
        yield batch


class SplitIntoRangesFn(beam.DoFn):
    def __init__(self, block_bytes: int):
        self._block_bytes = block_bytes

    def process(self, metadata):
        yield from split_ranges(metadata.path, metadata.size_in_bytes, self._block_bytes)


class ReadRangeFn(beam.DoFn):
    """(path, start, end) to the range's lines, as batches of bytes (``read_range``)."""

    def __init__(self, lines_per_batch: int):
        self._lines_per_batch = lines_per_batch

    def infer_output_type(self, input_type):
        return bytes

    def get_output_batch_type(self, input_element_type):
        return list[bytes]

    @beam.DoFn.yields_batches
    def process(self, file_range):
        path, start, end = file_range
        # AUTO picks the codec from the extension, as ReadFromText does; a compressed file is one range.
        with FileSystems.open(path, compression_type=CompressionTypes.AUTO) as handle:
            yield from read_range(handle, start, end, self._lines_per_batch)


class ReadLineBlocks(beam.PTransform):
    """Every line of the files matching ``pattern`` (local or any Beam filesystem), as bytes without the newline.

    A pattern that matches nothing fails when the pipeline runs (``ReadFromText`` fails when it is built;
    the backtest checks its input before either).
    """

    def __init__(self, pattern: str, block_bytes: int = BLOCK_BYTES, lines_per_batch: int = LINES_PER_BATCH):
        super().__init__()
        if block_bytes < 1 or lines_per_batch < 1:
            raise ValueError("block_bytes and lines_per_batch must be >= 1")
        self._pattern = pattern
        self._block_bytes = block_bytes
        self._lines_per_batch = lines_per_batch

    def expand(self, pbegin):
        return (
            pbegin
            | "MatchFiles" >> fileio.MatchFiles(self._pattern, empty_match_treatment=EmptyMatchTreatment.DISALLOW)
            | "SplitIntoRanges" >> beam.ParDo(SplitIntoRangesFn(self._block_bytes))
            # Ranges are few and made on one worker; spread them so every worker reads some.
            | "SpreadRanges" >> beam.Reshuffle()
            | "ReadRanges" >> beam.ParDo(ReadRangeFn(self._lines_per_batch)).with_output_types(bytes)
        )
