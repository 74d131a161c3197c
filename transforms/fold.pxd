# Cython declarations for transforms/fold.py, used only when the package is built (setup.py build_ext):
# the .py file stays plain Python and runs unchanged where it is not compiled. Keep each field here in step
# with fold.FIELDS (tests/transforms/test_fold.py checks both lists and both builds).
cimport cython


# The signal's event-time position, for fold_batch: a C integer, so reading it does no module lookup. (As a C
# global it is not an attribute of the compiled module; SIGNAL_INDEX, a dict, is.)
cdef Py_ssize_t _TIME_INDEX


cdef class Accumulator:
    # Counts, sums and millisecond times: C integers, read and written without a Python object.
    cdef public long long events, streams, stream_ms, near_threshold, short_streams
    cdef public long long logins, failed_logins, signups, playlist_adds
    cdef public long long payments, failed_payments, small_payments
    cdef public long long first_ms, last_ms, hours
    cdef public long long short_paid, cut_paid, cut_near
    # None, a value, a set or a sketch (distinct values); a dict (top-share counters); a list (trace ids);
    # a dict (extractor states).
    cdef public object users, devices, ips, tracks, artists, playlists, cards, countries
    cdef public object stream_artists, stream_tracks, playlist_artists, trace_ids, extra


@cython.locals(acc=Accumulator, t=cython.longlong, hour_bit=cython.longlong, cap=cython.Py_ssize_t,
               trace_cap=cython.Py_ssize_t, failed=cython.bint, small=cython.bint, by_type=dict, values=set)
cpdef fold_signal(accs, s)


@cython.locals(acc=Accumulator, ms=cython.longlong, cap=cython.Py_ssize_t, top_cap=cython.Py_ssize_t,
               short=cython.bint, short_paid=cython.bint, near=cython.bint, cut=cython.bint, values=set,
               c=dict, paid_ms=cython.longlong, short_paid_ms=cython.longlong, near_ms=cython.longlong,
               slack_ms=cython.longlong)
cpdef _fold_stream(accs, s)


@cython.locals(i=cython.Py_ssize_t, n=cython.Py_ssize_t, t=cython.longlong, size_ms=cython.longlong,
               window_start=cython.longlong, index=cython.Py_ssize_t, accs=list, acc=Accumulator, by_start=dict,
               by_id=dict, start=object)
cpdef Py_ssize_t fold_batch(batch, Py_ssize_t begin, tables, rest, dict partials, Py_ssize_t max_keys) except -1


@cython.locals(t=cython.longlong, size_ms=cython.longlong, window_start=cython.longlong, acc=Accumulator)
cpdef add_partials(signal, plan, dict partials, list accs)


@cython.locals(out=Accumulator, a=Accumulator)
cpdef Accumulator merge(accs)


@cython.locals(a=Accumulator, c=Accumulator)
cpdef Accumulator copy_accumulator(a)


@cython.locals(acc=Accumulator)
cpdef bint _has_full_top_counter(acc) except -1


@cython.locals(acc=Accumulator)
cpdef set copy_to_longer_windows(dict whole, dict partials, span_sec, dict copied)


# The small helpers the fold calls per field: as cpdef functions, the compiled callers reach them by a C call.
cpdef _distinct(values, value)


cpdef dict _top(dict counts, key)


@cython.locals(i=cython.Py_ssize_t, n=cython.Py_ssize_t, cap=cython.Py_ssize_t)
cpdef list _add_trace(list sample, trace_id)


cpdef _distinct_to_wire(v)


cpdef _distinct_from_wire(v)


@cython.locals(a=Accumulator)
cpdef bytes encode_accumulator(a, encode_extra)


@cython.locals(a=Accumulator)
cpdef Accumulator decode_accumulator(data, decode_extra)
