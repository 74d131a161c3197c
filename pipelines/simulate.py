"""Seeded synthetic traffic with ground-truth labels: legitimate listeners, attacks and look-alikes.

Every scenario is a small class with parameters and a ``generate`` method that
yields signal dicts (the JSON wire format) and a ``labels`` method naming the
entities it makes: ``attack`` entities the rules should catch, ``lookalike``
entities (super-fans, sleep loops, a dormitory NAT, a viral track) that look
odd but must never be enforced against, and ``legit`` background listeners.

The same seed always gives the same file, byte for byte.

Run locally::

    python -m pipelines.simulate --output /tmp/signals.jsonl --labels /tmp/labels.jsonl --hours 24 --seed 7
    python -m pipelines.simulate --output /tmp/signals.avro --format avro --labels /tmp/labels.jsonl

Publish to a Pub/Sub topic (the emulator, when PUBSUB_EMULATOR_HOST is set) at a steady rate::

    python -m pipelines.simulate --output /tmp/s.jsonl --labels /tmp/l.jsonl --hours 1 \\
        --publish_topic projects/test-project/topics/signals --rate 300
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import time
import typing
from collections.abc import Iterator

import orjson

from schemas.avro import millis_to_rfc3339
from transforms.parse import parse_rfc3339_ms

_LOGGER = logging.getLogger(__name__)

HOUR_MS = 3_600_000
DEFAULT_START = "2026-11-02T00:00:00Z"


class Label(typing.NamedTuple):
    entity_type: str
    entity_id: str
    scenario: str
    kind: str  # attack | lookalike | legit
    first_seen: str = ""  # event time of the entity's first signal (RFC 3339)


_ENTITY_FIELDS = {"user": "user_id", "device": "device_id", "ip": "ip", "track": "track_id", "artist": "artist_id"}


@dataclasses.dataclass
class World:
    """Shared context: time range, RNG and a music catalogue."""

    start_ms: int
    hours: int
    rng: random.Random
    artists: int = 2000
    tracks_per_artist: int = 10

    def __post_init__(self):
        self.end_ms = self.start_ms + self.hours * HOUR_MS
        self._seq = 0
        rng = self.rng
        self.track_length_ms = {
            f"t{a:05d}_{t:02d}": rng.randint(120_000, 360_000)
            for a in range(self.artists)
            for t in range(self.tracks_per_artist)
        }
        self.track_ids = list(self.track_length_ms)
        # Zipf-like popularity: cumulative weights for fast weighted choice.
        weights = [1.0 / (rank + 10) for rank in range(len(self.track_ids))]
        rng.shuffle(self.track_ids)
        total = 0.0
        self.cum_weights = []
        for w in weights:
            total += w
            self.cum_weights.append(total)

    def next_id(self, prefix: str) -> str:
        self._seq += 1
        return f"{prefix}{self._seq:09d}"

    def popular_track(self) -> str:
        return self.rng.choices(self.track_ids, cum_weights=self.cum_weights, k=1)[0]

    @staticmethod
    def artist_of(track_id: str) -> str:
        return "a" + track_id[1:6]

    def event(self, event_type: str, t_ms: int, user_id: str, **fields) -> dict:
        out = {
            "event_id": self.next_id("ev"),
            "event_type": event_type,
            "event_time": millis_to_rfc3339(int(t_ms)),
            "user_id": user_id,
            "trace_id": self.next_id("tr"),
        }
        out.update({k: v for k, v in fields.items() if v is not None})
        return out

    def stream(self, t_ms, user_id, track_id, ms_played, **ctx) -> dict:
        return self.event(
            "stream",
            t_ms,
            user_id,
            track_id=track_id,
            artist_id=self.artist_of(track_id),
            ms_played=int(ms_played),
            # The ingest fills the track's length from the catalogue (schemas/signal_v1.avsc).
            track_duration_ms=self.track_length_ms.get(track_id),
            **ctx,
        )

    def diurnal_hour(self) -> float:
        """An hour of day weighted toward evenings, as listening is."""
        return self.rng.choices(
            range(24), weights=[2, 1, 1, 1, 1, 2, 4, 6, 7, 6, 5, 5, 6, 6, 5, 5, 6, 7, 8, 9, 9, 8, 6, 4]
        )[0]


def _ip(rng: random.Random, block: int) -> str:
    return f"10.{block}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"


class Scenario:
    name = "scenario"
    kind = "legit"

    def generate(self, world: World) -> Iterator[dict]:
        raise NotImplementedError

    def labels(self) -> list[Label]:
        return []


@dataclasses.dataclass
class Listener:
    user_id: str
    device_id: str
    ip: str
    country: str


def listening_session(world: World, who: Listener, start_ms: int, minutes: float, pick=None) -> Iterator[dict]:
    """A realistic session: mostly full plays, some early skips, the odd partial play."""
    rng = world.rng
    t = start_ms
    end = min(start_ms + minutes * 60_000, world.end_ms - 1)
    pick = pick or world.popular_track
    while t < end:
        track = pick()
        length = world.track_length_ms[track]
        roll = rng.random()
        if roll < 0.25:
            played = rng.randint(1_500, 25_000)
        elif roll < 0.30:
            played = rng.randint(30_000, min(length, 150_000))
        else:
            played = length
        yield world.stream(t, who.user_id, track, played, device_id=who.device_id, ip=who.ip, country=who.country)
        t += played + rng.randint(200, 4_000)


@dataclasses.dataclass
class OrganicListeners(Scenario):
    """Background population: daily rhythm, skips, many artists, shared carrier IPs, travel."""

    users: int = 800
    name = "organic"
    kind = "legit"

    def generate(self, world):
        rng = world.rng
        carrier_ips = [_ip(rng, 64) for _ in range(max(1, self.users // 15))]  # CGNAT: ~15 users per IP
        self._ids = []
        for _ in range(self.users):
            who = Listener(
                user_id=world.next_id("u"),
                device_id=world.next_id("d"),
                ip=rng.choice(carrier_ips) if rng.random() < 0.5 else _ip(rng, 32),
                country=rng.choice(["SE", "US", "GB", "DE", "BR", "MX", "FR", "IN"]),
            )
            self._ids.append(who.user_id)
            playlists = [world.next_id("pl") for _ in range(rng.randint(1, 3))]
            travels = rng.random() < 0.05
            for day in range(max(1, world.hours // 24 + (world.hours % 24 > 0))):
                for _ in range(rng.choice([0, 1, 1, 2, 2, 3])):
                    start = (
                        world.start_ms + day * 24 * HOUR_MS + world.diurnal_hour() * HOUR_MS + rng.randint(0, HOUR_MS)
                    )
                    if start >= world.end_ms:
                        continue
                    if travels and rng.random() < 0.5:
                        who = dataclasses.replace(who, ip=_ip(rng, 96), country=rng.choice(["ES", "JP", "IT"]))
                    if rng.random() < 0.3:
                        ok = rng.random() < 0.97
                        yield world.event(
                            "login", start - 5_000, who.user_id, success=ok, device_id=who.device_id, ip=who.ip
                        )
                        if not ok:
                            yield world.event(
                                "login", start - 2_000, who.user_id, success=True, device_id=who.device_id, ip=who.ip
                            )
                    for sig in listening_session(world, who, start, rng.uniform(15, 120)):
                        yield sig
                        if rng.random() < 0.02:
                            yield world.event(
                                "playlist_add",
                                world_ms(sig) + 1_000,
                                who.user_id,
                                playlist_id=rng.choice(playlists),
                                track_id=sig["track_id"],
                                artist_id=sig["artist_id"],
                                device_id=who.device_id,
                                ip=who.ip,
                            )
            if rng.random() < 0.05:
                t = world.start_ms + rng.randint(0, world.hours * HOUR_MS - 1)
                yield world.event(
                    "payment",
                    t,
                    who.user_id,
                    amount_cents=rng.choice([999, 1199, 1699]),
                    currency="USD",
                    card_fingerprint=world.next_id("card"),
                    success=rng.random() < 0.95,
                    device_id=who.device_id,
                    ip=who.ip,
                )

    def labels(self):
        return [Label("user", u, self.name, self.kind) for u in self._ids]


def world_ms(sig: dict) -> int:
    return parse_rfc3339_ms(sig["event_time"])


@dataclasses.dataclass
class StreamFarm(Scenario):
    """Bot accounts looping a few tracks of one artist, just past 30 s, around the clock."""

    accounts: int = 12
    devices: int = 3
    ips: int = 2
    tracks: int = 5
    play_ms: tuple[int, int] = (30_500, 38_000)  # each play stops somewhere in this range
    name = "stream_farm"
    kind = "attack"

    def generate(self, world):
        rng = world.rng
        artist = rng.randrange(world.artists)
        self.artist_id = f"a{artist:05d}"
        catalogue = [f"t{artist:05d}_{t:02d}" for t in range(self.tracks)]
        self.device_ids = [world.next_id("d") for _ in range(self.devices)]
        self.ip_list = [_ip(rng, 200) for _ in range(self.ips)]
        self.user_ids = [world.next_id("u") for _ in range(self.accounts)]
        for i, user in enumerate(self.user_ids):
            device, ip = self.device_ids[i % self.devices], self.ip_list[i % self.ips]
            t = world.start_ms + rng.randint(0, 600_000)
            while t < world.end_ms:
                played = rng.randint(*self.play_ms)
                yield world.stream(t, user, rng.choice(catalogue), played, device_id=device, ip=ip, country="US")
                t += played + rng.randint(500, 3_000)

    def labels(self):
        return (
            [Label("user", u, self.name, self.kind) for u in self.user_ids]
            + [Label("device", d, self.name, self.kind) for d in self.device_ids]
            + [Label("artist", self.artist_id, self.name, self.kind)]
        )


@dataclasses.dataclass
class StreamFarmPastAMinute(StreamFarm):
    """A farm that stops its plays just past a minute: half the paid plays an hour of one stopping at 31 s,
    and nothing just past the threshold for the features that count that. Only its tracks' lengths give
    it away (most plays cut off minutes before the end). Its accounts are labelled; its devices and artist
    are not, since no rule reads them for this (the device and artist rules count plays just past 30 s)."""

    play_ms: tuple[int, int] = (61_000, 75_000)
    name = "stream_farm_minute"

    def labels(self):
        return [Label("user", u, self.name, self.kind) for u in self.user_ids]


@dataclasses.dataclass
class CredentialStuffing(Scenario):
    """Many usernames, mostly failed logins, from a few IPs, for a couple of hours."""

    ips: int = 3
    attempts_per_hour: int = 1800
    hours: int = 2
    start_hour: int = 3
    name = "credential_stuffing"
    kind = "attack"

    def generate(self, world):
        rng = world.rng
        self.ip_list = [_ip(rng, 150) for _ in range(self.ips)]
        start = world.start_ms + self.start_hour * HOUR_MS
        total = self.attempts_per_hour * self.hours
        for n in range(total):
            t = start + int(n * self.hours * HOUR_MS / total) + rng.randint(0, 2_000)
            yield world.event(
                "login",
                t,
                f"victim{rng.randint(0, 10**7):08d}",
                success=rng.random() < 0.02,
                ip=self.ip_list[n % self.ips],
                device_id=world.next_id("d"),
                user_agent="python-requests/2.31",
            )

    def labels(self):
        return [Label("ip", ip, self.name, self.kind) for ip in self.ip_list]


@dataclasses.dataclass
class SignupBurst(Scenario):
    """Fake accounts created in bursts from a few devices."""

    devices: int = 3
    signups_per_device: int = 20
    start_hour: int = 10
    name = "signup_burst"
    kind = "attack"

    def generate(self, world):
        rng = world.rng
        self.device_ids = [world.next_id("d") for _ in range(self.devices)]
        ip = _ip(rng, 151)
        for device in self.device_ids:
            t = world.start_ms + self.start_hour * HOUR_MS + rng.randint(0, 600_000)
            for _ in range(self.signups_per_device):
                yield world.event("signup", t, world.next_id("u"), device_id=device, ip=ip, country="VN")
                t += rng.randint(20_000, 90_000)

    def labels(self):
        return [Label("device", d, self.name, self.kind) for d in self.device_ids]


@dataclasses.dataclass
class CardTesting(Scenario):
    """Many small payments on many cards, mostly declined, from one device."""

    users: int = 2
    attempts: int = 40
    cards: int = 30
    start_hour: int = 14
    name = "card_testing"
    kind = "attack"

    def generate(self, world):
        rng = world.rng
        self.device_id = world.next_id("d")
        self.user_ids = [world.next_id("u") for _ in range(self.users)]
        cards = [world.next_id("card") for _ in range(self.cards)]
        ip = _ip(rng, 152)
        t = world.start_ms + self.start_hour * HOUR_MS
        for n in range(self.attempts):
            yield world.event(
                "payment",
                t,
                self.user_ids[n % self.users],
                amount_cents=rng.randint(50, 150),
                currency="USD",
                card_fingerprint=cards[n % self.cards],
                success=rng.random() < 0.2,
                device_id=self.device_id,
                ip=ip,
            )
            t += rng.randint(10_000, 60_000)

    def labels(self):
        return [Label("user", u, self.name, self.kind) for u in self.user_ids] + [
            Label("device", self.device_id, self.name, self.kind)
        ]


@dataclasses.dataclass
class PlaylistStuffing(Scenario):
    """Accounts stuffing one artist's tracks into many playlists."""

    accounts: int = 4
    adds_per_hour: int = 80
    hours: int = 2
    start_hour: int = 18
    name = "playlist_stuffing"
    kind = "attack"

    def generate(self, world):
        rng = world.rng
        artist = rng.randrange(world.artists)
        tracks = [f"t{artist:05d}_{t:02d}" for t in range(world.tracks_per_artist)]
        self.user_ids = [world.next_id("u") for _ in range(self.accounts)]
        for user in self.user_ids:
            device, ip = world.next_id("d"), _ip(rng, 153)
            playlists = [world.next_id("pl") for _ in range(25)]
            start = world.start_ms + self.start_hour * HOUR_MS
            total = self.adds_per_hour * self.hours
            for n in range(total):
                track = rng.choice(tracks)
                yield world.event(
                    "playlist_add",
                    start + int(n * self.hours * HOUR_MS / total),
                    user,
                    playlist_id=rng.choice(playlists),
                    track_id=track,
                    artist_id=world.artist_of(track),
                    device_id=device,
                    ip=ip,
                )

    def labels(self):
        return [Label("user", u, self.name, self.kind) for u in self.user_ids]


@dataclasses.dataclass
class SuperFans(Scenario):
    """Fans replaying one album nearly all day: full plays, one artist, many hours."""

    fans: int = 5
    name = "super_fan"
    kind = "lookalike"

    def generate(self, world):
        rng = world.rng
        self.user_ids = []
        for _ in range(self.fans):
            who = Listener(world.next_id("u"), world.next_id("d"), _ip(rng, 33), "GB")
            self.user_ids.append(who.user_id)
            artist = rng.randrange(world.artists)
            album = [f"t{artist:05d}_{t:02d}" for t in range(world.tracks_per_artist)]
            for day in range(max(1, world.hours // 24)):
                start = world.start_ms + day * 24 * HOUR_MS + 7 * HOUR_MS
                for sig in listening_session(world, who, start, 15 * 60, pick=lambda album=album: rng.choice(album)):
                    if sig["ms_played"] < 30_000:  # fans rarely skip their favourite album
                        sig["ms_played"] = world.track_length_ms[sig["track_id"]]
                    yield sig

    def labels(self):
        return [Label("user", u, self.name, self.kind) for u in self.user_ids]


@dataclasses.dataclass
class SleepLoop(Scenario):
    """One track on repeat all night."""

    sleepers: int = 5
    name = "sleep_loop"
    kind = "lookalike"

    def generate(self, world):
        rng = world.rng
        self.user_ids = []
        for _ in range(self.sleepers):
            who = Listener(world.next_id("u"), world.next_id("d"), _ip(rng, 34), "DE")
            self.user_ids.append(who.user_id)
            track = world.popular_track()
            length = world.track_length_ms[track]
            for day in range(max(1, world.hours // 24)):
                t = world.start_ms + day * 24 * HOUR_MS + rng.randint(0, HOUR_MS)
                stop = min(t + 8 * HOUR_MS, world.end_ms - 1)
                while t < stop:
                    yield world.stream(
                        t, who.user_id, track, length, device_id=who.device_id, ip=who.ip, country=who.country
                    )
                    t += length + 100

    def labels(self):
        return [Label("user", u, self.name, self.kind) for u in self.user_ids]


@dataclasses.dataclass
class Dormitory(Scenario):
    """Hundreds of students behind one NAT IP: many users, logins and sign-ups per IP."""

    students: int = 200
    name = "dormitory"
    kind = "lookalike"

    def generate(self, world):
        rng = world.rng
        self.nat_ip = _ip(rng, 100)
        self.user_ids = []
        for n in range(self.students):
            who = Listener(world.next_id("u"), world.next_id("d"), self.nat_ip, "US")
            self.user_ids.append(who.user_id)
            start = world.start_ms + world.diurnal_hour() * HOUR_MS + rng.randint(0, HOUR_MS)
            if n % 7 == 0:  # new students sign up, each on their own phone
                yield world.event("signup", start - 60_000, who.user_id, device_id=who.device_id, ip=who.ip)
            ok = rng.random() < 0.93
            app = "StreamApp/8.9.2 (Android 14)"
            yield world.event(
                "login", start - 5_000, who.user_id, success=ok, device_id=who.device_id, ip=who.ip, user_agent=app
            )
            if not ok:
                yield world.event(
                    "login",
                    start - 2_000,
                    who.user_id,
                    success=True,
                    device_id=who.device_id,
                    ip=who.ip,
                    user_agent=app,
                )
            yield from listening_session(world, who, start, rng.uniform(20, 90))

    def labels(self):
        return [Label("ip", self.nat_ip, self.name, self.kind)] + [
            Label("user", u, self.name, self.kind) for u in self.user_ids
        ]


@dataclasses.dataclass
class ViralTrack(Scenario):
    """A track that goes viral overnight: thousands of real listeners, real plays."""

    listeners: int = 1500
    start_hour: int = 20
    name = "viral_track"
    kind = "lookalike"

    def generate(self, world):
        rng = world.rng
        self.track_id = world.popular_track()
        length = world.track_length_ms[self.track_id]
        for _ in range(self.listeners):
            who = Listener(world.next_id("u"), world.next_id("d"), _ip(rng, 35), rng.choice(["US", "BR", "MX"]))
            t = world.start_ms + self.start_hour * HOUR_MS + int(rng.expovariate(1 / 3600_000))
            if t >= world.end_ms:
                continue
            for _ in range(rng.randint(1, 4)):
                played = length if rng.random() < 0.8 else rng.randint(2_000, 25_000)
                yield world.stream(
                    t, who.user_id, self.track_id, played, device_id=who.device_id, ip=who.ip, country=who.country
                )
                t += played + 500
        self.artist_id = world.artist_of(self.track_id)

    def labels(self):
        return [
            Label("track", self.track_id, self.name, self.kind),
            Label("artist", self.artist_id, self.name, self.kind),
        ]


MALFORMED_SAMPLES = (
    b"not json at all",
    b'{"event_id": "x1", "event_type": "stream"',
    b"\xff\xfe\x00garbage",
    b"[1, 2, 3]",
    b'{"event_type": "login", "event_time": "2026-11-02T01:00:00Z", "user_id": "u1", "success": true}',
    b'{"event_id": "bad-ip", "event_type": "login", "event_time": "2026-11-02T01:00:00Z", "user_id": "u1", "success": true, "ip": "999.1.1.1"}',
    b'{"event_id": "neg", "event_type": "stream", "event_time": "2026-11-02T01:00:00Z", "user_id": "u1", "track_id": "t1", "artist_id": "a1", "ms_played": -5}',
    b'{"event_id": "notime", "event_type": "signup", "event_time": "yesterday", "user_id": "u1"}',
    b'{"event_id": "ty", "event_type": "payment", "event_time": "2026-11-02T01:00:00Z", "user_id": "u1", "amount_cents": "100", "currency": "USD", "card_fingerprint": "c", "success": false}',
    b'{"event_id": "unknown-type", "event_type": "scrobble", "event_time": "2026-11-02T01:00:00Z", "user_id": "u1"}',
)


def default_scenarios(scale: float = 1.0, hours: int = 24) -> list[Scenario]:
    """Every scenario, sized for the demo at scale 1.0; attack start times spread over ``hours``."""

    def n(x: int) -> int:
        return max(1, int(x * scale))

    def at(hour_of_24: int) -> int:
        return hour_of_24 * hours // 24

    span = max(1, min(2, hours))
    return [
        OrganicListeners(users=n(800)),
        # Farms run about four accounts per device.
        StreamFarm(accounts=n(12), devices=max(1, n(12) // 4)),
        CredentialStuffing(start_hour=at(3), hours=span, attempts_per_hour=max(600, int(1800 * scale))),
        SignupBurst(start_hour=at(10)),
        CardTesting(start_hour=at(14)),
        PlaylistStuffing(start_hour=at(18), hours=span),
        SuperFans(fans=n(5)),
        SleepLoop(sleepers=n(5)),
        Dormitory(students=n(200)),
        ViralTrack(listeners=n(1500), start_hour=at(20)),
        # Last, so the scenarios above draw the same random numbers as before it was added.
        StreamFarmPastAMinute(accounts=n(6), devices=max(1, n(6) // 3)),
    ]


def simulate(
    seed: int, hours: int, scale: float = 1.0, start: str = DEFAULT_START, malformed: int = 20
) -> tuple[list[bytes], list[Label]]:
    """Generate (JSON lines sorted by event time, labels) for the default scenarios."""
    rng = random.Random(seed)
    world = World(start_ms=parse_rfc3339_ms(start), hours=hours, rng=rng)
    events: list[dict] = []
    labels: list[Label] = []
    end = millis_to_rfc3339(world.end_ms)
    for scenario in default_scenarios(scale, hours):
        generated = [e for e in scenario.generate(world) if e["event_time"] < end]
        first_seen: dict[tuple[str, str], str] = {}
        for e in generated:
            for entity_type, field in _ENTITY_FIELDS.items():
                key = (entity_type, e.get(field))
                if key[1] is not None and (key not in first_seen or e["event_time"] < first_seen[key]):
                    first_seen[key] = e["event_time"]
        events.extend(generated)
        labels.extend(
            lb._replace(first_seen=first_seen.get((lb.entity_type, lb.entity_id), "")) for lb in scenario.labels()
        )
    events.sort(key=lambda e: e["event_time"])
    lines = [orjson.dumps(e) for e in events]
    for i in range(malformed):
        lines.insert(rng.randrange(len(lines) + 1), MALFORMED_SAMPLES[i % len(MALFORMED_SAMPLES)])
    return lines, labels


def write_jsonl(path: str, lines: list[bytes]) -> None:
    with open(path, "wb") as handle:
        for line in lines:
            handle.write(line.replace(b"\n", b" ") + b"\n")


def write_avro(path: str, lines: list[bytes]) -> int:
    """The valid signals as Avro records (schemas/signal_v1.avsc); malformed lines cannot be typed and are left out."""
    import fastavro

    from schemas import SIGNAL_SCHEMA
    from transforms.parse import InvalidSignal, parse_signal

    records = []
    for line in lines:
        try:
            records.append(parse_signal(line).signal._asdict())
        except InvalidSignal:
            continue
    with open(path, "wb") as handle:
        fastavro.writer(handle, fastavro.parse_schema(SIGNAL_SCHEMA), records, codec="deflate")
    return len(records)


def publish(lines: list[bytes], topic: str, rate: float) -> int:
    """Publish lines to a Pub/Sub topic at ``rate`` per second (honours PUBSUB_EMULATOR_HOST)."""
    from google.cloud import pubsub_v1

    publisher = pubsub_v1.PublisherClient()
    started = time.monotonic()
    futures = []
    for i, line in enumerate(lines):
        futures.append(publisher.publish(topic, line))
        ahead = i / rate - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)
    for future in futures:
        future.result(timeout=60)
    return len(futures)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="Signals .jsonl to write.")
    parser.add_argument("--labels", required=True, help="Ground-truth labels .jsonl to write.")
    parser.add_argument("--seed", type=int, default=7, help="Random seed; same seed, same bytes.")
    parser.add_argument("--hours", type=int, default=24, help="Hours of traffic, starting at --start.")
    parser.add_argument("--scale", type=float, default=1.0, help="Multiplies population sizes.")
    parser.add_argument("--start", default=DEFAULT_START, help="RFC 3339 start of the traffic.")
    parser.add_argument("--malformed", type=int, default=20, help="Malformed lines to mix in.")
    parser.add_argument(
        "--format", choices=("jsonl", "avro"), default="jsonl", help="jsonl (wire format) or avro (typed records)."
    )
    parser.add_argument("--publish_topic", default=None, help="Also publish to projects/P/topics/T at --rate.")
    parser.add_argument("--rate", type=float, default=300, help="Signals per second when publishing.")
    args = parser.parse_args(argv)
    lines, labels = simulate(args.seed, args.hours, args.scale, args.start, args.malformed)
    if args.format == "avro":
        written = write_avro(args.output, lines)
    else:
        write_jsonl(args.output, lines)
        written = len(lines)
    write_jsonl(args.labels, [orjson.dumps(label._asdict()) for label in labels])
    print(f"wrote {written} signals to {args.output} and {len(labels)} labels to {args.labels}")
    if args.publish_topic:
        print(f"published {publish(lines, args.publish_topic, args.rate)} messages to {args.publish_topic}")


if __name__ == "__main__":
    main()
