"""Tokens and scopes: the token file's validation, and 401 / 403 on every endpoint that needs a token."""

import hashlib

import pytest

from service.auth import OPERATE, READ, TokenConfigError, parse_tokens
from tests.service.conftest import OPERATE_TOKEN, OPERATOR, READ_TOKEN, READER, UNKNOWN_TOKEN, auth

_REASON = {"reason": "Incident 12: checking access"}
_ENTRY = {"entity": "user", "id": "u-auth-1", "reason": "Partner load test", "owner": "trust-safety"}
WRITES = [
    ("post", "/v1/decisions/d-auth-1/reversal", _REASON),
    ("post", "/v1/allowlist", _ENTRY),
    ("post", "/v1/allowlist/0/expire", _REASON),
    ("post", "/v1/rules/stream_farm_exclude/pause", _REASON),
    ("post", "/v1/rules/stream_farm_exclude/resume", _REASON),
]
READS = [
    ("get", "/v1/entities/user/u-1/mitigations", None),
    ("post", "/v1/mitigations:batchLookup", {"entities": [{"entity_type": "user", "entity_id": "u-1"}]}),
    ("get", "/v1/allowlist", None),
    ("get", "/v1/rules/paused", None),
]


def _call(client, method, path, body, headers):
    return client.request(method, path, json=body, headers=headers)


# --- every endpoint but /healthz needs a known token -----------------------------------------
@pytest.mark.parametrize(("method", "path", "body"), WRITES + READS)
@pytest.mark.parametrize(
    "headers",
    [{}, auth(UNKNOWN_TOKEN), {"Authorization": f"Basic {OPERATE_TOKEN}"}, {"Authorization": "Bearer"}],
    ids=["missing", "unknown", "not-bearer", "empty"],
)
def test_no_valid_token_is_401_with_a_bearer_challenge(client, method, path, body, headers):
    response = _call(client, method, path, body, headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.json() == {"error": "a valid bearer token is required"}


@pytest.mark.parametrize("path", [path for method, path, _ in WRITES + READS if method == "post"])
@pytest.mark.parametrize("headers", [{}, auth(UNKNOWN_TOKEN)], ids=["missing", "unknown"])
def test_no_valid_token_is_401_before_a_malformed_body_is_looked_at(client, path, headers):
    # FastAPI decodes a JSON body before an endpoint's dependencies run: without a check ahead of it, a caller
    # with no token would be told about the body (422) instead of being asked to authenticate.
    response = client.post(path, content=b'{"reason": ', headers={**headers, "content-type": "application/json"})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.json() == {"error": "a valid bearer token is required"}


# --- writes need the operate scope ---------------------------------------------------------------
@pytest.mark.parametrize(("method", "path", "body"), WRITES)
def test_a_read_token_cannot_write(client, settings, method, path, body):
    before = open(settings.allowlist_path).read()
    response = _call(client, method, path, body, auth(READ_TOKEN))
    assert response.status_code == 403
    assert response.json() == {"error": "this token lacks the 'operate' scope"}
    assert open(settings.allowlist_path).read() == before


# --- operate implies read ----------------------------------------------------------------------
@pytest.mark.parametrize(("method", "path", "body"), READS)
@pytest.mark.parametrize("token", [READ_TOKEN, OPERATE_TOKEN])
def test_read_and_operate_tokens_can_read(client, method, path, body, token):
    assert _call(client, method, path, body, auth(token)).status_code == 200


def test_healthz_needs_no_token(client):
    assert client.get("/healthz").json() == {"status": "ok"}


# --- the token file ---------------------------------------------------------------------------
def _file(*entries) -> str:
    lines = ["tokens:"]
    for digest, actor, scopes in entries:
        lines += [f"  - sha256: {digest}", f"    actor: {actor}", f"    scopes: {scopes}"]
    return "\n".join(lines) + "\n"


def test_the_file_maps_digests_to_actors_and_operate_implies_read():
    verifier = parse_tokens(
        _file(
            (hashlib.sha256(READ_TOKEN.encode()).hexdigest(), READER, "[read]"),
            (hashlib.sha256(OPERATE_TOKEN.encode()).hexdigest().upper(), OPERATOR, "[operate]"),
        ),
        "tokens.yaml",
    )
    assert verifier.principal(READ_TOKEN).actor == READER
    assert verifier.principal(READ_TOKEN).scopes == {READ}
    assert verifier.principal(OPERATE_TOKEN).scopes == {READ, OPERATE}
    assert verifier.principal(UNKNOWN_TOKEN) is None
    assert verifier.principal("") is None


_DIGEST = "a" * 64


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tokens: {}", "must be a mapping with a 'tokens' list"),
        ("[", "not valid YAML"),
        (_file((READ_TOKEN, "x", "[read]")), "entry #1: field 'sha256': must be the 64 hex digits"),  # a raw token
        (_file((_DIGEST, "x", "[read]"), (_DIGEST, "y", "[read]")), "entry #2: field 'sha256': the same token"),
        (_file((_DIGEST, "''", "[read]")), "entry #1: field 'actor'"),
        (_file((_DIGEST, "x", "[admin]")), "entry #1: field 'scopes'"),
        (_file((_DIGEST, "x", "[]")), "entry #1: field 'scopes'"),
        (_file((_DIGEST, "x", "[read]")) + "    token: hunter2\n", "entry #1: field 'token': unknown field"),
    ],
)
def test_a_bad_token_file_is_refused_naming_entry_and_field(text, message):
    with pytest.raises(TokenConfigError, match="tokens.yaml: ") as err:
        parse_tokens(text, "tokens.yaml")
    assert message in str(err.value)
