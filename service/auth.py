"""Bearer tokens with scopes, for service-to-service callers and operators.

Scopes: ``read`` (look mitigations, the allowlist and paused rules up) and
``operate`` (reverse decisions, change the allowlist, pause and resume rules);
``operate`` implies ``read``. The token file holds only SHA-256 digests, so a
copy of it (in a config repo, a backup, a support ticket) grants nothing::

    tokens:
      - sha256: <64 hex digits: SHA-256 of the gateway's token>
        actor: enforcement-gateway
        scopes: [read]
      - sha256: <64 hex digits: SHA-256 of Alice's token>
        actor: alice@example.com
        scopes: [read, operate]

Make a digest with ``printf %s "$TOKEN" | sha256sum``. The actor written to
the audit table is the token's, never one a request claims.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re

import yaml
from fastapi import HTTPException, status

READ = "read"
OPERATE = "operate"
SCOPES = (READ, OPERATE)
_HEX64 = re.compile(r"[0-9a-f]{64}")
CHALLENGE = {"WWW-Authenticate": "Bearer"}
UNAUTHENTICATED = "a valid bearer token is required"


class TokenConfigError(ValueError):
    """A token file that cannot be used. The message names the file, entry and field."""

    def __init__(self, source: str, problem: str, entry: int | None = None, field: str | None = None):
        where = source + (f": entry #{entry}" if entry is not None else "") + (f": field '{field}'" if field else "")
        super().__init__(f"{where}: {problem}")


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who is calling, as the token file names them."""

    actor: str
    scopes: frozenset[str]


@dataclasses.dataclass(frozen=True)
class _Token:
    digest: bytes
    principal: Principal


class TokenVerifier:
    """Maps a presented bearer token to its principal by comparing SHA-256 digests in constant time."""

    def __init__(self, tokens: tuple[_Token, ...] = ()):
        self._tokens = tokens

    def principal(self, token: str | None) -> Principal | None:
        if not token:
            return None
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        match = None
        for entry in self._tokens:  # no early exit: the time taken does not say which entry matched
            if hmac.compare_digest(digest, entry.digest):
                match = entry.principal
        return match

    def require(self, token: str | None, scope: str) -> Principal:
        """The caller, or 401 (no or unknown token) / 403 (known token without the scope)."""
        principal = self.principal(token)
        if principal is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, UNAUTHENTICATED, headers=CHALLENGE)
        if scope not in principal.scopes:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"this token lacks the '{scope}' scope")
        return principal


def parse_tokens(text: str, source: str) -> TokenVerifier:
    """Validate a token file (see the module docstring); fails at start, never per request."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise TokenConfigError(source, f"not valid YAML: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("tokens"), list) or set(doc) - {"tokens"}:
        raise TokenConfigError(source, "must be a mapping with a 'tokens' list")
    tokens, seen = [], set()
    for n, raw in enumerate(doc["tokens"], start=1):
        if not isinstance(raw, dict):
            raise TokenConfigError(source, "must be a mapping", n)
        unknown = set(raw) - {"sha256", "actor", "scopes"}
        if unknown:
            raise TokenConfigError(
                source, "unknown field (allowed: sha256, actor, scopes)", n, sorted(map(str, unknown))[0]
            )
        digest = raw.get("sha256")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest.lower()):
            raise TokenConfigError(
                source, "must be the 64 hex digits of the token's SHA-256 (never the token)", n, "sha256"
            )
        if digest.lower() in seen:
            raise TokenConfigError(source, "the same token is listed twice", n, "sha256")
        seen.add(digest.lower())
        actor = raw.get("actor")
        if not isinstance(actor, str) or not actor.strip():
            raise TokenConfigError(source, "is required: the audit table records it", n, "actor")
        scopes = raw.get("scopes")
        if not isinstance(scopes, list) or not scopes or any(s not in SCOPES for s in scopes):
            raise TokenConfigError(source, f"must be a non-empty list of {', '.join(SCOPES)}", n, "scopes")
        granted = set(scopes) | ({READ} if OPERATE in scopes else set())
        tokens.append(_Token(bytes.fromhex(digest.lower()), Principal(actor.strip(), frozenset(granted))))
    return TokenVerifier(tuple(tokens))


def load_tokens(path: str | None) -> TokenVerifier:
    """The token file at ``path``; no path means no token is accepted (every call but /healthz and /openapi.json gets
    401). The file is read once, at start: revoking a token takes a restart."""
    if not path:
        return TokenVerifier()
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as err:
        raise TokenConfigError(path, f"cannot be read: {err.strerror}") from None
    return parse_tokens(text, path)
