"""Create the BigQuery dataset and tables the streaming job writes to, idempotently.

Schemas come from ``schemas/*.avsc``. Tables are partitioned by day on their
time column and clustered by entity, which is what audit and appeal queries
filter on. The job itself writes with ``CREATE_NEVER``, so a typo in a table
name fails loudly instead of creating a stray table.

With ``--bigtable_instance`` it also creates the Bigtable table of active
mitigations (``schemas.mitigation_state``): one column family whose
garbage-collection rule is a one-second maximum age, because each cell's
timestamp is its mitigation's expiry. The instance itself is not created here:
it carries clusters, nodes and cost, and belongs with the rest of the
infrastructure.

Run against BigQuery (and Bigtable)::

    python -m pipelines.provision --project PROJECT --dataset mitigation --location EU \\
        --bigtable_instance INSTANCE

Run against the local emulators::

    BIGQUERY_EMULATOR_HOST=http://127.0.0.1:9050 BIGTABLE_EMULATOR_HOST=127.0.0.1:8086 \\
        python -m pipelines.provision --project test-project --dataset mitigation --bigtable_instance test-instance
"""

from __future__ import annotations

import argparse
import os
import sys

from google.api_core.client_options import ClientOptions
from google.api_core.exceptions import AlreadyExists
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery, bigtable
from google.cloud.bigtable.column_family import MaxAgeGCRule

from schemas import AUDIT_SCHEMA, DEAD_LETTER_SCHEMA, DECISION_SCHEMA, FEATURE_ROW_SCHEMA, bigquery_schema
from schemas.mitigation_state import FAMILY, GC_MAX_AGE, TABLE_ID

# table name -> (schema, partition column, clustering columns)
TABLES = {
    "decisions": (DECISION_SCHEMA, "decided_at_ms", ["entity_type", "entity_id", "rule_id"]),
    "audit": (AUDIT_SCHEMA, "decided_at_ms", ["entity_type", "entity_id", "rule_id"]),
    "dead_letters": (DEAD_LETTER_SCHEMA, "failed_at_ms", ["stage", "reason"]),
    "features": (FEATURE_ROW_SCHEMA, "window_start_ms", ["entity_type", "entity_id"]),
}


def client_for(project: str, emulator_host: str | None = None) -> bigquery.Client:
    """A real BigQuery client; pointed at the emulator when one is given or in the environment."""
    host = emulator_host or os.environ.get("BIGQUERY_EMULATOR_HOST")
    if host:
        return bigquery.Client(
            project=project, credentials=AnonymousCredentials(), client_options=ClientOptions(api_endpoint=host)
        )
    return bigquery.Client(project=project)


def _field(spec: dict) -> bigquery.SchemaField:
    return bigquery.SchemaField(
        spec["name"],
        spec["type"],
        mode=spec.get("mode", "NULLABLE"),
        description=spec.get("description"),
        fields=[_field(f) for f in spec.get("fields", [])],
    )


def provision(client: bigquery.Client, dataset: str, location: str | None = None) -> list[str]:
    """Create the dataset and tables if missing; return the full table ids."""
    ds = bigquery.Dataset(f"{client.project}.{dataset}")
    if location:
        ds.location = location
    client.create_dataset(ds, exists_ok=True)
    created = []
    for name, (schema, partition_field, clustering) in TABLES.items():
        table = bigquery.Table(
            f"{client.project}.{dataset}.{name}", schema=[_field(f) for f in bigquery_schema(schema)["fields"]]
        )
        table.time_partitioning = bigquery.TimePartitioning(
            type_=bigquery.TimePartitioningType.DAY, field=partition_field
        )
        table.clustering_fields = clustering
        table.description = schema.get("doc", "")
        client.create_table(table, exists_ok=True)
        created.append(table.table_id)
    return created


def provision_bigtable(project: str, instance: str, table_id: str = TABLE_ID) -> bool:
    """Create the mitigations table if missing; return whether it was created.

    An existing table is left as it is (its families and GC rule are not
    changed), so running this against a live table is safe. Honours
    ``BIGTABLE_EMULATOR_HOST``.
    """
    table = bigtable.Client(project=project, admin=True).instance(instance).table(table_id)
    if table.exists():
        return False
    try:
        table.create(column_families={FAMILY: MaxAgeGCRule(GC_MAX_AGE)})
    except AlreadyExists:  # created between the check and the create, e.g. by a concurrent run
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", required=True, help="GCP project (test-project for the emulator).")
    parser.add_argument("--dataset", required=True, help="Dataset to create or reuse.")
    parser.add_argument("--location", default=None, help="Dataset location, e.g. EU (ignored by the emulator).")
    parser.add_argument("--emulator_host", default=None, help="BigQuery emulator URL (else $BIGQUERY_EMULATOR_HOST).")
    parser.add_argument(
        "--bigtable_instance",
        default="",
        help="Existing Bigtable instance to create the active-mitigations table in; empty (default) skips Bigtable. "
        "The emulator is used when $BIGTABLE_EMULATOR_HOST is set.",
    )
    parser.add_argument("--bigtable_table", default=TABLE_ID, help="Bigtable table of active mitigations.")
    args = parser.parse_args(argv)
    tables = provision(client_for(args.project, args.emulator_host), args.dataset, args.location)
    print(f"dataset {args.project}.{args.dataset}: tables {', '.join(tables)} ready")
    if args.bigtable_instance:
        created = provision_bigtable(args.project, args.bigtable_instance, args.bigtable_table)
        state = "created" if created else "already exists"
        print(f"bigtable {args.project}/{args.bigtable_instance}/{args.bigtable_table}: {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
