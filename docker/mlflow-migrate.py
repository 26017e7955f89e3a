"""Copy an MLflow SQLite database into the stack's PostgreSQL database, ids and all.

Run by docker/mlflow-server.sh when TINYTALE_MLFLOW_MIGRATE_FROM names a SQLite file (the old
stack's /mlflow/db/mlflow.db, or a local mlflow.db mounted into the container):

    python mlflow-migrate.py SOURCE.db TARGET_URI

MLflow has no command that moves a tracking database to another backend, but both ends share
one schema: the source is brought to the installed MLflow's schema (on a copy; the file itself
is only read), then every table is copied row by row in foreign-key order. Run ids, experiment
ids, metric histories, tags, registered models, versions and aliases keep their values, so
`mlflow-artifacts:/` URIs still point at the same artifacts volume. PostgreSQL's id sequences
are moved past the copied ids afterwards.

The target must be a new stack's database (no runs, no registered models, no experiment but
MLflow's "Default"): merging two histories could collide on ids. Exit 2 with one sentence if not.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import sqlalchemy as sa

BATCH_ROWS = 5000


def fail(sentence: str) -> None:
    print(f"mlflow-migrate: ERROR: {sentence}", file=sys.stderr)
    sys.exit(2)


def upgrade(uri: str) -> None:
    done = subprocess.run(["mlflow", "db", "upgrade", uri], capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        fail(f"`mlflow db upgrade` failed on {uri.split(':', 1)[0]}; see its output above")


def check_target_is_new(target: sa.Engine) -> None:
    with target.connect() as conn:
        runs = conn.execute(sa.text("SELECT count(*) FROM runs")).scalar_one()
        models = conn.execute(sa.text("SELECT count(*) FROM registered_models")).scalar_one()
        experiments = conn.execute(
            sa.text("SELECT count(*) FROM experiments WHERE experiment_id <> 0")).scalar_one()
    if runs or models or experiments:
        fail(f"the target database already holds {runs} runs, {models} registered models and "
             f"{experiments} experiments besides 'Default'; migrate into a new stack's database "
             "(before its first training), or back it up and start from an empty one")


def convert(value: object, column: sa.Column) -> object:
    """SQLite keeps booleans as 0/1 and JSON as text; PostgreSQL wants the real types."""
    if value is None:
        return None
    if isinstance(column.type, sa.Boolean):
        return bool(value)
    if isinstance(column.type, sa.JSON) and isinstance(value, str):
        return json.loads(value)
    return value


def copy_rows(source: sa.Engine, target: sa.Engine) -> dict[str, int]:
    source_meta, target_meta = sa.MetaData(), sa.MetaData()
    source_meta.reflect(source)
    target_meta.reflect(target)
    copied: dict[str, int] = {}
    with source.connect() as src, target.begin() as dst:
        tables = [t for t in target_meta.sorted_tables if t.name != "alembic_version"]
        # The seed rows of a fresh database ('Default' experiment and the like) are replaced
        # by the source's own; check_target_is_new made sure nothing else is there.
        for table in reversed(tables):
            dst.execute(table.delete())
        for table in tables:
            if table.name not in source_meta.tables:
                continue
            src_table = source_meta.tables[table.name]
            names = [c.name for c in table.columns if c.name in src_table.columns]
            columns = [table.columns[n] for n in names]
            result = src.execution_options(yield_per=BATCH_ROWS).execute(
                sa.select(*[src_table.columns[n] for n in names]))
            count = 0
            for rows in result.partitions():
                batch = [{c.name: convert(v, c) for c, v in zip(columns, row, strict=True)}
                         for row in rows]
                dst.execute(table.insert(), batch)
                count += len(batch)
            copied[table.name] = count
        for table in tables:
            for column in table.primary_key.columns:
                if not isinstance(column.type, sa.Integer):
                    continue
                sequence = dst.execute(sa.text("SELECT pg_get_serial_sequence(:t, :c)"),
                                       {"t": table.name, "c": column.name}).scalar()
                if sequence:
                    top = dst.execute(sa.select(sa.func.max(column))).scalar()
                    dst.execute(sa.text("SELECT setval(:s, :v, :called)"),
                                {"s": sequence, "v": max(top or 1, 1), "called": top is not None})
    return copied


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        fail("usage: mlflow-migrate.py SOURCE.db TARGET_URI")
    source_path, target_uri = Path(argv[0]), argv[1]
    if not source_path.is_file():
        fail(f"TINYTALE_MLFLOW_MIGRATE_FROM='{source_path}' is not a file; name the old "
             "stack's /mlflow/db/mlflow.db or a mounted mlflow.db")
    if not target_uri.startswith("postgresql"):
        fail(f"the target '{target_uri.split(':', 1)[0]}' is not PostgreSQL; set "
             "TINYTALE_MLFLOW_DATABASE_URI to the stack's postgresql:// URI")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "source.db"
        # sqlite3's backup reads a consistent snapshot even of a file in use.
        with sqlite3.connect(f"file:{source_path}?mode=ro", uri=True) as src, \
                sqlite3.connect(copy) as dst:
            src.backup(dst)
        upgrade(f"sqlite:///{copy}")
        # The target: mlflow-server.sh upgraded it just before running this.
        target = sa.create_engine(target_uri)
        check_target_is_new(target)
        copied = copy_rows(sa.create_engine(f"sqlite:///{copy}"), target)
    print(json.dumps({"copied_rows": {k: v for k, v in copied.items() if v}}))
    print(f"mlflow-migrate: copied {copied.get('runs', 0)} runs, "
          f"{copied.get('metrics', 0)} metric values and {copied.get('registered_models', 0)} "
          f"registered models from {source_path}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
