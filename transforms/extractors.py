"""The extension point for data engineers: feature extractors with their own per-window state.

A built-in feature (``transforms.features.FEATURES``) is derived from the
shared ``Accumulator``. An *extractor* brings its own small state instead, so
a new signal can be counted without touching the accumulator's code. Register
one with ``@register`` and rules can use its ``name`` as a feature right away:
the rule loader, the validator and ``python -m pipelines.rules features`` all
see it.

An extractor must:

* keep its state small and bounded (it lives per entity per window, in
  Dataflow state); for distinct values use ``transforms.distinct``
  (exact up to ``DISTINCT_CAP``, a HyperLogLog sketch past it), as the
  login-account extractors below do;
* be mergeable: ``merge(a, b)`` must give what one pass over both halves
  gives, because Beam combines partial states (``tests/kit.py`` has
  ``assert_mergeable`` to check this);
* own its states: ``add`` may update a state in place (the example's does),
  so ``merge`` may update and return ``a`` but must not return ``b`` or
  keep a part of it that ``add`` would change: an accumulator merged into
  another goes on being its own (``assert_mergeable`` checks this too);
* be pure: no I/O or clocks, so a backtest and the streaming job agree;
* give a ``copy`` if its state can be copied faster than ``copy.deepcopy``
  does it (the default). A backtest copies a user's hour into the user's day
  (``transforms.features.copy_accumulator``), once per user per hour for
  every extractor state the hour holds, and every merge (the streaming
  job's too) copies a state the accumulator merged into lacks. In the 1M
  benchmark input's credential-stuffing hours, where most user-hours hold
  login states, deep copies made the fold about 40% dearer than the
  extractors' own copies (benchmarks/README.md, change 26). A copy must
  share nothing that ``add`` or ``merge`` would change, in either state
  (``assert_mergeable`` checks it).

The README tutorial ("Adding a feature extractor") walks through
``scripted_client_share`` below, which the default pack's
``scripted_login_review`` rule uses.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from copy import deepcopy

from schemas import EVENT_TYPES, Signal
from transforms.distinct import DISTINCT_CAP, add_distinct, copy_distinct, distinct_count, merge_distinct

__all__ = ["DISTINCT_CAP", "EXTRACTORS", "FeatureExtractor", "register"]


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
    """One named feature with its own state.

    Attributes:
      name: the feature name rules use (snake_case, unique across all features).
      description: one sentence, shown by ``python -m pipelines.rules features``.
      event_types: the signal types it reads (others never reach ``add``).
      create: a fresh state.
      add: fold one signal into a state, returning the state.
      merge: combine two states (order must not matter); may update and return the first, never the second.
      value: the feature value of a state, given the window length in seconds.
      copy: a state with the same value as the given one that shares nothing ``add`` or ``merge`` would
        change, in either; by default ``copy.deepcopy``, which is always right and slow for the small states
        extractors keep.
    """

    name: str
    description: str
    event_types: tuple[str, ...]
    create: Callable[[], object]
    add: Callable[[object, Signal], object]
    merge: Callable[[object, object], object]
    value: Callable[[object, int], float]
    copy: Callable[[object], object] = deepcopy


EXTRACTORS: dict[str, FeatureExtractor] = {}


def register(extractor: FeatureExtractor) -> FeatureExtractor:
    """Add an extractor to the registry; a clash or a bad name fails at import, not per element."""
    if not re.fullmatch(r"[a-z][a-z0-9_]{2,63}", extractor.name):
        raise ValueError(f"extractor name {extractor.name!r} must be snake_case")
    if extractor.name in EXTRACTORS:
        raise ValueError(f"extractor {extractor.name!r} is registered twice")
    unknown = set(extractor.event_types) - set(EVENT_TYPES)
    if unknown:
        raise ValueError(f"extractor {extractor.name!r} reads unknown event types {sorted(unknown)}")
    EXTRACTORS[extractor.name] = extractor
    return extractor


# --- Example: the share of logins made by scripted HTTP clients -----------------------------
# Credential-stuffing tools send the default user agent of an HTTP library; the
# official apps and browsers never do. State: [scripted logins, logins seen].
_SCRIPTED_AGENT = re.compile(
    r"^(python-requests|python-urllib|aiohttp|curl|wget|go-http-client|okhttp|java|libwww-perl|httpclient"
    r"|apache-httpclient|axios|node-fetch)\b",
    re.IGNORECASE,
)


def _add_login(state: list, s: Signal) -> list:
    state[1] += 1
    if s.user_agent and _SCRIPTED_AGENT.match(s.user_agent):
        state[0] += 1
    return state


register(
    FeatureExtractor(
        name="scripted_client_share",
        description="Share of login attempts whose user agent is a scripting library (python-requests, curl, ...).",
        event_types=("login",),
        create=lambda: [0, 0],
        add=_add_login,
        merge=lambda a, b: [a[0] + b[0], a[1] + b[1]],
        value=lambda state, window_sec: state[0] / state[1] if state[1] else 0.0,
        copy=list.copy,  # two ints
    )
)


# --- Accounts behind an IP's logins ----------------------------------------------------------------
# Credential stuffing tries many accounts, most of which fail. ``distinct_users`` counts every account seen
# in the window, including everyone who only streamed, and ``failed_login_ratio`` counts attempts, so a
# dormitory NAT with a few devices retrying a changed password every 30 s looked like stuffing: 60 failed
# attempts "for 67 accounts". These count the accounts that tried to log in, and those that failed.
# State: a distinct-value state (transforms.distinct): the account ids exactly up to DISTINCT_CAP, a
# HyperLogLog sketch past it, so the ratio of the two stays right on an IP with thousands of accounts.
def _login_account_adder(failed_only: bool):
    def add(state, s: Signal):
        if not failed_only or not s.success:
            return add_distinct(state, s.user_id)
        return state

    return add


def _account_count(state, window_sec: int) -> float:
    # Every window with a login computes this: a set's length without the call distinct_count would add.
    return float(len(state) if state.__class__ is set else distinct_count(state))


register(
    FeatureExtractor(
        name="login_accounts",
        description="Distinct accounts with a login attempt (not every account seen in the window).",
        event_types=("login",),
        create=set,
        add=_login_account_adder(failed_only=False),
        merge=merge_distinct,
        value=_account_count,
        copy=copy_distinct,
    )
)
register(
    FeatureExtractor(
        name="failed_login_accounts",
        description="Distinct accounts with at least one failed login attempt.",
        event_types=("login",),
        create=set,
        add=_login_account_adder(failed_only=True),
        merge=merge_distinct,
        value=_account_count,
        copy=copy_distinct,
    )
)
