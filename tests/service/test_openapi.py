"""The published spec matches the app, and generated requests (valid and invalid) never get a 5xx."""

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from pipelines.options import PROJECT_ROOT
from service.__main__ import openapi_spec
from tests.service.conftest import OPERATE_TOKEN, auth


def test_the_committed_spec_is_the_apps():
    committed = json.loads((PROJECT_ROOT / "docs" / "openapi.json").read_text())
    assert committed == openapi_spec(), "regenerate it: python -m service --write_openapi docs/openapi.json"


def test_the_spec_documents_every_route_and_its_errors():
    spec = openapi_spec()
    operations = {(path, method): op for path, item in spec["paths"].items() for method, op in item.items()}
    assert len(operations) == 10
    for (path, _), op in operations.items():
        assert "200" in op["responses"] or "201" in op["responses"]
        if path != "/healthz":
            assert op["security"] == [{"HTTPBearer": []}]
            assert {"401", "403", "413", "422"} <= set(op["responses"])


@pytest.fixture
def api_schema(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema.config.generation.update(max_examples=15)
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


# An operate token reaches every operation (operate implies read). Writes land in this test's own copies
# of the allowlist and overrides files; reversals of generated ids are looked up in the emulator and 404.
@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_no_generated_request_gets_a_server_error(case):
    case.call_and_validate(headers=auth(OPERATE_TOKEN), checks=[not_a_server_error])
