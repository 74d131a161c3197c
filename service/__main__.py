"""Serve the Mitigation API with uvicorn, or write its OpenAPI spec.

The token file holds SHA-256 digests of bearer tokens with their actor and
scopes (see ``service/auth.py``). Tables and topic default to the names
``pipelines.provision`` and the README use, in ``--project``.

Write the spec (``docs/openapi.json`` is checked against the app by a test)::

    python -m service --write_openapi docs/openapi.json

Run locally against the emulators (set PUBSUB_EMULATOR_HOST,
BIGQUERY_EMULATOR_HOST and BIGTABLE_EMULATOR_HOST first)::

    python -m service --project test-project --bigtable_instance local --tokens tokens.yaml \\
        --rule_overrides out/rule_overrides.yaml

Run in production (one host per allowlist and overrides file, behind the service mesh's TLS; ``--workers``
processes on that host share the files through a lock, one process per core the API may use). The policy
files are the Cloud Storage objects the Dataflow job re-reads (its ``--allowlist`` and ``--rule_overrides``),
so an operator's change reaches the job at its next reload (``service/policy_files.py``). The API's service
account needs to read, create and delete objects in that bucket (``roles/storage.objectUser``): replacing an
object needs the delete permission, so ``roles/storage.objectCreator`` alone fails every change after its
audit row::

    python -m service --project PROJECT --bigtable_instance mitigation --tokens /etc/mitigation-api/tokens.yaml \\
        --allowlist gs://BUCKET/rules/allowlist.yaml --rule_overrides gs://BUCKET/rules/rule_overrides.yaml \\
        --host 0.0.0.0 --port 8080 --workers 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys

from pipelines.logs import setup_logging
from pipelines.options import DEFAULT_ALLOWLIST, DEFAULT_RULES, PROJECT_ROOT
from schemas.mitigation_state import TABLE_ID
from service.app import SETTINGS_ENV, Settings, create_app
from service.auth import TokenConfigError
from service.policy_files import GCS_PREFIX, PolicyPathError
from transforms.rulepack import RulePackError

DEFAULT_RULE_OVERRIDES = str(PROJECT_ROOT / "rules" / "rule_overrides.yaml")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", help="GCP project of the Bigtable instance, tables and topic.")
    parser.add_argument("--bigtable_instance", help="Bigtable instance holding the active mitigations.")
    parser.add_argument("--bigtable_table", default=TABLE_ID, help="Bigtable table of active mitigations.")
    parser.add_argument("--tokens", help="YAML file of accepted tokens (SHA-256 digests, actor, scopes).")
    parser.add_argument("--dataset", default="mitigation", help="BigQuery dataset of the default tables.")
    parser.add_argument("--decisions_table", help="PROJECT:DATASET.TABLE of decisions (default: in --dataset).")
    parser.add_argument("--audit_table", help="PROJECT:DATASET.TABLE of audit rows (default: in --dataset).")
    parser.add_argument("--decisions_topic", help="projects/P/topics/T for reversals (default: .../topics/decisions).")
    parser.add_argument("--rules", default=DEFAULT_RULES, help="Rule pack YAML: the rule ids that can be paused.")
    parser.add_argument(
        "--allowlist",
        default=DEFAULT_ALLOWLIST,
        help="Allowlist YAML the API edits and the streaming job reads (--allowlist there): local or gs:// path.",
    )
    parser.add_argument(
        "--rule_overrides",
        default=DEFAULT_RULE_OVERRIDES,
        help="Rule pauses YAML the API writes and the streaming job reads (--rule_overrides there): local or gs:// "
        "path.",
    )
    parser.add_argument("--max_body_bytes", type=int, default=64 * 1024, help="Largest request body accepted.")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="Server processes sharing the port (one per core the API may use; benchmarks/README.md).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
    parser.add_argument("--port", type=int, default=8080, help="Port to listen on.")
    parser.add_argument("--write_openapi", metavar="PATH", help="Write the OpenAPI spec to PATH and exit.")
    return parser


def openapi_spec() -> dict:
    """The spec does not depend on settings; these placeholders reach no backend and accept no token."""
    placeholder = Settings(
        project="-",
        bigtable_instance="-",
        decisions_topic="-",
        decisions_table="-",
        audit_table="-",
        allowlist_path=DEFAULT_ALLOWLIST,
        rule_overrides_path="-",
        rules_path=DEFAULT_RULES,
        tokens_path=None,
    )
    return create_app(placeholder).openapi()


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.write_openapi:
        text = json.dumps(openapi_spec(), indent=2, ensure_ascii=False) + "\n"
        pathlib.Path(args.write_openapi).write_text(text, encoding="utf-8")
        print(f"wrote {args.write_openapi}")
        return 0
    missing = [f"--{name}" for name in ("project", "bigtable_instance", "tokens") if not getattr(args, name)]
    if missing:
        parser.error(f"{', '.join(missing)} required to serve")
    if args.max_body_bytes <= 0:
        parser.error("--max_body_bytes must be positive")
    if args.workers <= 0:
        parser.error("--workers must be positive")
    settings = Settings(
        project=args.project,
        bigtable_instance=args.bigtable_instance,
        bigtable_table=args.bigtable_table,
        decisions_topic=args.decisions_topic or f"projects/{args.project}/topics/decisions",
        decisions_table=args.decisions_table or f"{args.project}:{args.dataset}.decisions",
        audit_table=args.audit_table or f"{args.project}:{args.dataset}.audit",
        allowlist_path=args.allowlist,
        rule_overrides_path=args.rule_overrides,
        rules_path=args.rules,
        tokens_path=args.tokens,
        max_body_bytes=args.max_body_bytes,
        freeze_gc=True,
    )
    setup_logging()
    try:
        app = create_app(settings)
    except (TokenConfigError, RulePackError, PolicyPathError) as err:  # named file, entry and field; a bad path
        print(f"error: {err}", file=sys.stderr)
        return 2
    # The store's clients load Google credentials when made, which each worker's start-up does (the app's
    # lifespan). Made here first, so missing credentials are this command's error, exit 2, rather than a
    # worker's start-up traceback (and, with --workers, a supervisor that then stops with status 0).
    from google.auth.exceptions import DefaultCredentialsError  # noqa: PLC0415 - only when serving

    from service.store import MitigationStore  # noqa: PLC0415 - the Bigtable client library, only when serving

    try:
        MitigationStore(settings.project, settings.bigtable_instance, settings.bigtable_table)
    except DefaultCredentialsError as err:
        print(f"error: no Google credentials for Bigtable: {err}", file=sys.stderr)
        return 2
    if any(path.startswith(GCS_PREFIX) for path in (settings.allowlist_path, settings.rule_overrides_path)):
        from google.cloud import storage  # noqa: PLC0415 - only for policy files in Cloud Storage

        try:  # the policy files' client is made on first use; without this, missing credentials are a 503 then
            storage.Client(project=settings.project)
        except DefaultCredentialsError as err:
            print(f"error: no Google credentials for Cloud Storage: {err}", file=sys.stderr)
            return 2

    import uvicorn

    # uvicorn's own logging config would print client addresses unmasked; ours masks IPs, and the app logs
    # each request by route template (AccessLogMiddleware) instead of uvicorn's access log.
    served = dict(host=args.host, port=args.port, log_config=None, access_log=False, server_header=False)
    if args.workers == 1:
        uvicorn.run(app, **served)
        return 0
    # uvicorn starts each worker process afresh; each builds its app from the settings checked above.
    os.environ[SETTINGS_ENV] = json.dumps(dataclasses.asdict(settings))
    uvicorn.run("service.app:app_from_environment", factory=True, workers=args.workers, **served)
    return 0


if __name__ == "__main__":
    sys.exit(main())
