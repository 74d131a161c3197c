"""Distinct-value states: exact up to the cap, a HyperLogLog sketch past it (transforms.distinct)."""

import copy
import pickle
import random
import statistics

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from transforms import distinct
from transforms.distinct import (
    DISTINCT_CAP,
    REGISTERS,
    HyperLogLog,
    add_distinct,
    copy_distinct,
    distinct_count,
    distinct_values,
    merge_distinct,
)


def _fold(values, cap=None):
    state = None
    for value in values:
        state = add_distinct(state, value, cap)
    return state


@pytest.mark.parametrize("n", [0, 1, 2, 100, DISTINCT_CAP])
def test_counts_are_exact_up_to_the_cap(n):
    state = _fold(f"u{i}" for i in [*range(n), *range(n)])  # every value twice
    assert distinct_count(state) == n
    assert state is None or state.__class__ is not HyperLogLog


def test_past_the_cap_a_state_becomes_a_sketch_of_fixed_size_whatever_comes_after():
    state = _fold(f"u{i}" for i in range(DISTINCT_CAP + 1))
    assert state.__class__ is HyperLogLog
    size = len(pickle.dumps(state))
    assert size < REGISTERS + 200
    for i in range(50_000):
        state = add_distinct(state, f"more{i}")
    assert len(pickle.dumps(state)) == size
    full_set = pickle.dumps(set(f"u{i}" for i in range(DISTINCT_CAP)))
    assert size * 7 < len(full_set)  # the set it replaced


def test_estimates_are_within_a_few_percent_past_the_cap():
    """1.04 / sqrt(4096) = 1.6% standard error: over 40 sets each is within 5% and they average within 2%."""
    errors = []
    for trial in range(40):
        n = 5_000 + trial * 2_377  # 5,000 to 97,703
        estimate = HyperLogLog.of(f"t{trial}-id-{i}" for i in range(n)).count()
        errors.append(abs(estimate - n) / n)
    assert max(errors) < 0.05, max(errors)
    assert statistics.mean(errors) < 0.02, statistics.mean(errors)


def test_an_empty_sketch_counts_nothing_and_a_sketch_counts_small_sets_exactly():
    assert HyperLogLog().count() == 0
    assert [HyperLogLog.of(f"v{i}" for i in range(n)).count() for n in (1, 2, 10, 50)] == [1, 2, 10, 50]


def test_a_large_set_still_counts_in_the_right_order_of_magnitude():
    estimate = HyperLogLog.of(str(i) for i in range(1_000_000)).count()
    assert 0.95 < estimate / 1_000_000 < 1.05, estimate


_id = st.integers(0, 300).map(lambda n: f"id{n}")
# Half the lists long enough that several partials of one split are sketches (hypothesis favours short lists).
_values = st.lists(_id, max_size=120) | st.lists(_id, min_size=30, max_size=120)


@settings(max_examples=150, deadline=None)
@given(_values, st.lists(st.integers(0, 120), max_size=4), st.sampled_from([2, 5, 40]), st.randoms())
@example([f"id{n}" for n in range(12)], [4, 8], 2, random.Random(0))  # three sketches
def test_any_split_merged_in_any_order_gives_what_one_pass_gives(values, cuts, cap, rnd):
    """Beam splits a window into partials as it likes; the count must not depend on how."""
    bounds = sorted({0, len(values), *(c for c in cuts if c <= len(values))})
    parts = [_fold(values[a:b], cap) for a, b in zip(bounds, bounds[1:], strict=False)]
    rnd.shuffle(parts)
    merged = None
    for part in parts:
        merged = merge_distinct(merged, part, cap)
    one_pass = _fold(values, cap)
    assert _canonical(merged) == _canonical(one_pass)
    assert distinct_count(merged) == distinct_count(one_pass)
    if len(set(values)) <= cap:
        assert distinct_count(one_pass) == len(set(values))


def _canonical(state):
    return bytes(state.registers) if state.__class__ is HyperLogLog else set(distinct_values(state))


@settings(max_examples=100, deadline=None)
@given(_values, _values, st.sampled_from([2, 5, 40]))
def test_a_merge_never_changes_or_returns_its_second_state(left, right, cap):
    mine, theirs = _fold(left, cap), _fold(right, cap)
    kept = copy.deepcopy(theirs)
    out = merge_distinct(mine, theirs, cap)
    assert _canonical(theirs) == _canonical(kept)
    if isinstance(theirs, (set, HyperLogLog)):
        assert out is not theirs
        before = pickle.dumps(out)
        for i in range(10):
            theirs = add_distinct(theirs, f"later{i}", cap)
        assert pickle.dumps(out) == before


@settings(max_examples=100, deadline=None)
@given(_values, _values, st.sampled_from([2, 5, 40]))
def test_a_copied_state_is_equal_and_independent_of_its_original_both_ways(values, more, cap):
    """``copy_distinct`` is how extractors copy their distinct-value states (transforms.extractors): a backtest
    copies a user's hour into the day, and what either one folds next must not reach the other."""
    for fold_into_copy in (False, True):
        original = _fold(values, cap)
        copied = copy_distinct(original)
        assert _canonical(copied) == _canonical(original)
        other = original if fold_into_copy else copied
        kept = copy.deepcopy(other)
        target = copied if fold_into_copy else original
        for value in [*more, *(f"later{i}" for i in range(50))]:
            target = add_distinct(target, value, cap)
        target = merge_distinct(target, _fold([f"merged{i}" for i in range(50)], cap), cap)
        assert _canonical(other) == _canonical(kept)


def test_copies_and_pickles_are_equal_and_independent():
    sketch = HyperLogLog.of(f"u{i}" for i in range(10_000))
    for other in (sketch.copy(), pickle.loads(pickle.dumps(sketch)), copy.deepcopy(sketch)):
        assert other.registers == sketch.registers and other.registers is not sketch.registers
        for i in range(1_000):
            other.add(f"more{i}")
        assert other.registers != sketch.registers  # 1,000 more values raise some register
        assert sketch.registers == HyperLogLog.of(f"u{i}" for i in range(10_000)).registers


def test_a_sketch_keeps_no_values_and_refuses_the_wrong_size():
    with pytest.raises(TypeError, match="does not keep its values"):
        distinct_values(HyperLogLog())
    with pytest.raises(ValueError, match="4096 registers"):
        HyperLogLog(b"\x00" * 10)


def test_the_hash_is_the_same_in_every_process():
    """Python's own hash of a str changes per process; the registers must not (workers merge each other's)."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    code = "from transforms.distinct import HyperLogLog; print(HyperLogLog.of(['a', 'b', 'c']).registers.hex())"
    runs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root).stdout
        for _ in "ab"
    }
    assert runs == {HyperLogLog.of(["a", "b", "c"]).registers.hex() + "\n"}


def test_the_cap_is_read_at_each_call(monkeypatch):
    monkeypatch.setattr(distinct, "DISTINCT_CAP", 3)
    assert _fold(["a", "b", "c"]).__class__ is set
    assert _fold(["a", "b", "c", "d"]).__class__ is HyperLogLog


def test_registers_follow_murmurhash3_x64_unsigned_the_format_kept_in_state():
    """A running job keeps sketches in its state and merges new ones into them, so the hash and the register
    layout are a stored format: a reference computed from the definition, and one pinned result."""
    import hashlib

    import mmh3

    values = [f"id{i}" for i in range(3_000)] + ["", "ü", "user0012345"]
    expected = bytearray(REGISTERS)
    for value in values:
        h = mmh3.hash64(value, seed=0, x64arch=True, signed=False)[0]
        index, rest = h >> 52, h & ((1 << 52) - 1)
        expected[index] = max(expected[index], 53 - rest.bit_length())  # 1 + the zeros before the first 1 bit
    assert HyperLogLog.of(values).registers == expected
    # (index, rank) of "a", "b", "c": (2133, 2), (1961, 1), (2275, 1).
    assert hashlib.sha256(HyperLogLog.of(["a", "b", "c"]).registers).hexdigest()[:16] == "d62cbd7ecca74614"


def test_the_cache_of_recent_ids_stays_bounded_and_changes_nothing(monkeypatch):
    monkeypatch.setattr(distinct, "_SLOTS_MAX", 50)
    monkeypatch.setattr(distinct, "_slots", {})
    sketch = HyperLogLog()
    for i in range(1_000):
        sketch.add(f"v{i % 300}")
        assert len(distinct._slots) <= 51
    monkeypatch.setattr(distinct, "_slots", {})
    assert sketch.registers == HyperLogLog.of(f"v{i}" for i in range(300)).registers


def test_a_count_past_the_cap_never_reads_below_it():
    """An estimate just past the cap reads low about half the time; the state knows it holds more."""
    lows = 0
    for trial in range(20):
        state = _fold(f"t{trial}-{i}" for i in range(DISTINCT_CAP + 1))
        lows += state.count() <= DISTINCT_CAP
        assert distinct_count(state) >= DISTINCT_CAP + 1
    assert lows > 0  # the floor was needed in some of these


def test_values_must_be_ids():
    with pytest.raises(TypeError, match=r"ids \(str\), not int"):
        add_distinct(None, 5)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from([4_100, 5_000, 9_000]), st.sampled_from([0.5, 0.97, 0.999, 1.0]))
def test_a_subset_never_counts_more_than_its_superset(seed, total, share):
    """Failed login accounts are a subset of the accounts that tried: their ratio must stay at most 1 whether
    each is a set or a sketch (a subset's registers never exceed its superset's, and counts past the cap have
    the same floor)."""
    rnd = random.Random(seed)
    tried = failed = None
    for i in range(total):
        value = f"s{seed}-{i}"
        tried = add_distinct(tried, value)
        if rnd.random() < share:
            failed = add_distinct(failed, value)
    assert distinct_count(failed) <= distinct_count(tried)
