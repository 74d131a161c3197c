"""Windows past the distinct cap: what a hot key's accumulator costs to fold, pickle, merge and count.

A viral track, a big artist or a carrier NAT address sees more than
``DISTINCT_CAP`` (4,096) distinct users, devices and IPs in a window, and
each of those fields is then a HyperLogLog sketch (``transforms.distinct``).
In process, no runner; two kinds of traffic, each folded as the batch fold
and the streaming combine fold it (``fold_signal``):

* ``viral``: plays by listeners never seen before, every id new, folded into
  two windows past the cap (the track's hour and the artist's hour): the
  dearest case, six sketch updates a signal, three of them hashing (the
  second window finds the ids in the cache of recent ones);
* ``artist``: an artist's hour of plays by a fixed crowd of listeners, ten
  plays each on average, into one window.

For each: µs a signal to fold (median of ``--repeats`` passes), the
accumulator's encoded bytes and the time to encode and decode it with the
coder Beam gives it (Dataflow
reads and writes a key's accumulator for its panes), to copy and merge it,
and the distinct counts it reports against the true ones. Run it from two
checkouts to compare code: the figures are for this machine only.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from apache_beam.coders import registry

from benchmarks.common import median, print_table, write_results
from tests.kit import T0_MS, signal
from transforms import features as F


def _listener(i: int) -> tuple[str, str, str]:
    return f"user{i:07d}", f"dev{i:07d}", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"


def traffic(kind: str, plays: int) -> tuple[list, int, int]:
    """(signals, windows each signal goes into, true distinct users)."""
    if kind == "viral":
        ids = [_listener(i) for i in range(plays)]
        track = "viral"
        windows = 2
    else:
        rnd = random.Random(7)
        crowd = [_listener(i) for i in range(max(1, plays // 10))]
        ids = [crowd[rnd.randrange(len(crowd))] for _ in range(plays)]
        track = None
        windows = 1
    rnd = random.Random(11)
    signals = [
        signal(
            "stream",
            T0_MS + n * 3_600_000 // plays,
            user_id=user,
            device_id=device,
            ip=ip,
            track_id=track or f"t{rnd.randrange(40)}",
            artist_id="star",
            ms_played=200_000,
        )
        for n, (user, device, ip) in enumerate(ids)
    ]
    return signals, windows, len({u for u, _, _ in ids})


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times)


def measure(kind: str, plays: int, repeats: int) -> dict:
    signals, windows, users = traffic(kind, plays)
    folded: list = []

    def fold():
        accs = [F.Accumulator() for _ in range(windows)]
        for s in signals:
            F.fold_signal(accs, s)
        folded[:] = accs

    fold_sec = _timed(fold, repeats)
    acc = folded[0]
    coder = registry.get_coder(object)  # what Beam encodes an accumulator with: pickle, for this class
    blob = coder.encode(acc)
    coder_sec = _timed(lambda: coder.decode(coder.encode(acc)), repeats * 10)
    merge_sec = _timed(lambda: F.merge([F.copy_accumulator(acc), acc]), repeats * 10)
    features = F.compute_features(acc, 3600)
    return {
        "traffic": kind,
        "plays": plays,
        "windows_per_signal": windows,
        "true_distinct_users": users,
        "fold_us_per_signal": round(fold_sec / plays * 1e6, 3),
        "encoded_bytes": len(blob),
        "encode_decode_ms": round(coder_sec * 1e3, 4),
        "copy_and_merge_ms": round(merge_sec * 1e3, 4),
        "distinct_users": features["distinct_users"],
        "distinct_devices": features["distinct_devices"],
        "distinct_ips": features["distinct_ips"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plays", type=int, default=60_000, help="Signals into each hot window.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed passes; figures are medians.")
    args = parser.parse_args(argv)
    runs = [measure(kind, args.plays, args.repeats) for kind in ("viral", "artist")]
    print_table(
        [
            "traffic",
            "windows",
            "true users",
            "fold µs/signal",
            "encoded B",
            "encode+decode ms",
            "copy+merge ms",
            "distinct users",
        ],
        [
            [
                r["traffic"],
                r["windows_per_signal"],
                r["true_distinct_users"],
                r["fold_us_per_signal"],
                r["encoded_bytes"],
                r["encode_decode_ms"],
                r["copy_and_merge_ms"],
                r["distinct_users"],
            ]
            for r in runs
        ],
    )
    print(f"wrote {write_results('hot_keys', {'plays': args.plays, 'repeats': args.repeats, 'runs': runs})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
