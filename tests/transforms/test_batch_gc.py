"""Batch workers' garbage-collector thresholds (transforms.batch_gc): raised by the backtest's DoFns, never lowered,
and left alone by the streaming job's parse step."""

from __future__ import annotations

import gc

import pytest

from transforms.batch_gc import BATCH_GC_THRESHOLD, tune_gc_for_batch
from transforms.features import PreAggregateFn
from transforms.parse import ParseSignalBatchFn, ParseSignalFn

PYTHON_DEFAULT = (700, 10, 10)


@pytest.fixture
def thresholds():
    """Python's default thresholds for the test, and this process's own back after it."""
    saved = gc.get_threshold()
    gc.set_threshold(*PYTHON_DEFAULT)
    yield
    gc.set_threshold(*saved)


def test_tuning_raises_every_threshold_to_the_batch_ones(thresholds):
    tune_gc_for_batch()
    assert gc.get_threshold() == BATCH_GC_THRESHOLD
    assert BATCH_GC_THRESHOLD[0] >= 1_000_000  # a young collection per million net allocations, not per 700


def test_tuning_never_lowers_a_threshold_set_higher(thresholds):
    gc.set_threshold(BATCH_GC_THRESHOLD[0] * 2, 5, BATCH_GC_THRESHOLD[2] * 3)
    tune_gc_for_batch()
    tune_gc_for_batch()  # idempotent
    assert gc.get_threshold() == (BATCH_GC_THRESHOLD[0] * 2, BATCH_GC_THRESHOLD[1], BATCH_GC_THRESHOLD[2] * 3)


@pytest.mark.parametrize(
    "make_fn",
    [
        pytest.param(lambda: ParseSignalBatchFn("test"), id="backtest-parse"),
        pytest.param(lambda: PreAggregateFn({3600: ("user",)}, whole_batch_ms=3_600_000), id="backtest-fold"),
    ],
)
def test_batch_steps_tune_their_worker_when_set_up(thresholds, make_fn):
    make_fn().setup()
    assert gc.get_threshold() == BATCH_GC_THRESHOLD


def test_the_streaming_parse_step_keeps_pythons_defaults(thresholds):
    ParseSignalFn("test").setup()
    assert gc.get_threshold() == PYTHON_DEFAULT
