"""Tracking errors a user can fix: a tracking URI MLflow cannot use, a server that refuses our
login or our Host header. Training must not start when it would log nothing (one sentence,
exit 2, nothing on disk), and a refusal mid-run must never cost a record: the spool keeps
every one until `tinytale sync` with good credentials sends them, once.

The servers are the one we ship, started by docker/mlflow-server.sh as in test_security.py:
one with basic auth on, one that answers only the Host header `localhost:PORT`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import TINY
from typer.testing import CliRunner

from tinytale.cli import app

REPO = Path(__file__).resolve().parents[1]
FAST = [*TINY, "train.epochs=2", "data.n_stories=24", "train.num_threads=1",
        "tracking.system_metrics=false"]


def sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def files_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*")) if folder.exists() else []


def clean_env(**values: str) -> dict[str, str]:
    """This environment without MLflow settings, plus `values`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(values)
    return env


# ---- tracking URIs MLflow cannot use ---------------------------------------------------------


def bad_store_uris(tmp_path: Path) -> dict[str, str]:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    return {
        "no such folder under /proc": "sqlite:////proc/nope/x.db",
        "a folder nothing can be created in": "sqlite:////proc/x.db",
        "sqlite under a file": f"sqlite:///{a_file}/x.db",
        "sqlite naming a folder": f"sqlite:///{tmp_path}",
        "file store under a file": f"file://{a_file}/mlruns",
        "plain path under a file": f"{a_file}/mlruns",
    }


@pytest.mark.parametrize("case", ["no such folder under /proc",
                                  "a folder nothing can be created in", "sqlite under a file",
                                  "sqlite naming a folder", "file store under a file",
                                  "plain path under a file"])
def test_a_local_store_that_cannot_be_created_is_one_sentence(tmp_path: Path, case: str) -> None:
    uri = bad_store_uris(tmp_path)[case]
    before = files_under(tmp_path)
    out = tmp_path / "runs"
    result = CliRunner().invoke(app, ["train", *sets(FAST), "--tracking-uri", uri,
                                      "--out", str(out)])
    assert result.exit_code == 2, (result.stderr, result.exception)
    (line,) = result.stderr.strip().splitlines()
    assert f"tracking URI '{uri}'" in line and "sqlite:///PATH.db" in line, line
    assert files_under(tmp_path) == before, "a refused URI must touch nothing"
    assert not out.exists()


def test_the_uri_from_the_environment_is_checked_too(tmp_path: Path) -> None:
    uri = "sqlite:////proc/nope/x.db"
    out = tmp_path / "runs"
    result = CliRunner().invoke(app, ["train", *sets(FAST), "--out", str(out)],
                                env={"MLFLOW_TRACKING_URI": uri})
    assert result.exit_code == 2, (result.stderr, result.exception)
    assert f"tracking URI '{uri}'" in result.stderr and result.stderr.count("\n") == 1
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway; "
                    "the /proc cases above stand in for it")
def test_a_read_only_folder_is_one_sentence(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    out = tmp_path / "runs"
    try:
        result = CliRunner().invoke(app, ["train", *sets(FAST), "--tracking-uri",
                                          f"sqlite:///{locked}/sub/x.db", "--out", str(out)])
    finally:
        locked.chmod(0o700)
    assert result.exit_code == 2, (result.stderr, result.exception)
    assert "cannot be created" in result.stderr and result.stderr.count("\n") == 1
    assert not any(locked.iterdir()) and not out.exists()


def test_the_file_store_mlflow_refuses_is_one_sentence(tmp_path: Path) -> None:
    uri = (tmp_path / "mlruns").as_uri()
    result = CliRunner().invoke(app, ["train", *sets(FAST), "--tracking-uri", uri,
                                      "--out", str(tmp_path / "runs")],
                                env={"MLFLOW_ALLOW_FILE_STORE": None})
    assert result.exit_code == 2, (result.stderr, result.exception)
    assert "file store" in result.stderr and "sqlite:///PATH.db" in result.stderr
    assert files_under(tmp_path) == []
