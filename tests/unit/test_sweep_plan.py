"""The sweep planner and the point protocol, without processes or servers: which points are
skipped, resumed or run afresh, with which command and environment, and how a point's
outcome is read back. tests/e2e/test_sweep.py runs the same rules end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tinytale.compare import RunCurves
from tinytale.launch import Stack
from tinytale.sweep.containers import ContainerPoints
from tinytale.sweep.plan import (
    PlannedPoint,
    PointFacts,
    Resumable,
    Target,
    checkpoint_folders,
    decide,
    plan_sweep,
)
from tinytale.sweep.protocol import parse_summary, read_outcome, status_of
from tinytale.sweep.spec import SweepPoint, SweepSpec

REPO = Path(__file__).resolve().parents[2]
URI = "http://127.0.0.1:5000"
SPEC = SweepSpec(name="reg", base=Path("base.yaml"), source=Path("sweep.yaml"), text="",
                 common={"train.epochs": 2},
                 points=[SweepPoint({"model.dropout": 0.0}), SweepPoint({"model.dropout": 0.2})])
HASHES = ("hash-a", "hash-b")  # the points' configs as of now


def facts(hashes: tuple[str | None, ...] = HASHES,
          errors: tuple[str | None, ...] = (None, None)) -> list[PointFacts]:
    return [PointFacts(point, dict(point.overrides), h, e)
            for point, h, e in zip(SPEC.points, hashes, errors, strict=True)]


def target(**changes) -> Target:
    return Target(**{"spec": SPEC, "experiment": "study", "parent_run_id": "parent",
                     "tracking_uri": URI, "out": Path("runs"), "cpu_count": 8,
                     "python": "python", "environ": {"PATH": "/bin", "TINYTALE_TEST_HOLD": "2:1"},
                     **changes})


def in_containers() -> ContainerPoints:
    return ContainerPoints(Stack(REPO, "cpu"), URI, "/app/launch/base.yaml", None)


def run(index: int, status: str, run_id: str, config_hash: str | None) -> RunCurves:
    """Point `index`'s run on the server; no config_hash: a run from before that tag."""
    point = SPEC.points[index]
    tags = {} if config_hash is None else {"config_hash": config_hash}
    return RunCurves(run_id, point.run_name, status, tags=tags, overrides=dict(point.overrides))


def plan(before: list[RunCurves] = (), checkpoints: dict[int, Resumable] | None = None,
         point_facts: list[PointFacts] | None = None, **changes) -> list[PlannedPoint]:
    where, known = target(**changes), point_facts or facts()
    decisions = decide(known, before, where.rerun)
    return plan_sweep(where, known, before, decisions, checkpoints or {})


# --------------------------------------------------------------------------- skip or run


@pytest.mark.parametrize("config_hash", ["hash-a", None])
def test_a_point_finished_with_its_config_is_skipped(config_hash):
    first, second = plan([run(0, "FINISHED", "r0", config_hash)])
    assert (first.action, first.finished.run_id) == ("skip", "r0")
    assert first.message == ("[1/2] dropout=0: already finished in run r0, skipped "
                             "(--rerun runs it again)")
    assert first.command == ()
    assert (second.action, second.message) == ("fresh", None)


def test_a_point_finished_with_another_config_runs_again_and_says_why():
    first, _ = plan([run(0, "FINISHED", "old", "hash-before-the-edit")])
    assert first.action == "fresh" and first.finished is None
    assert first.message == ("[1/2] dropout=0: finished in run old with another config (the "
                             "base file or the sweep's set changed); running it again")


def test_the_newest_finished_run_of_the_current_config_stands_for_the_point():
    before = [run(0, "FINISHED", "r1", "hash-a"), run(0, "FINISHED", "r2", None),
              run(0, "FINISHED", "r3", "other")]
    assert plan(before)[0].finished.run_id == "r2"


def test_rerun_runs_finished_points_again_without_resuming():
    before = [run(0, "FINISHED", "r0", "hash-a"), run(1, "KILLED", "r1", "hash-b")]
    checkpoint = Resumable(Path("runs/reg/dropout=0.2/x/last.pt"), "r1")
    first, second = plan(before, {1: checkpoint}, rerun=True)
    assert (first.action, first.message) == ("fresh", None)
    assert (second.action, second.resume_from, second.resume_run_id) == ("fresh", None, None)
    assert "--resume" not in second.command
    assert checkpoint_folders(target(rerun=True), facts(), decide(facts(), before, True)) == {}
    boxed = plan(before, rerun=True, containers=in_containers())
    assert [p.action for p in boxed] == ["fresh", "fresh"]
    assert not any("--resume" in p.command for p in boxed)


def test_an_invalid_config_fails_without_a_command():
    known = facts(hashes=("hash-a", None), errors=(None, "model.n_head=3 does not divide"))
    _, bad = plan(point_facts=known)
    assert (bad.action, bad.config_error) == ("invalid", "model.n_head=3 does not divide")
    assert bad.command == () and bad.tags["tinytale.sweep"] == "reg"
    assert checkpoint_folders(target(), known, decide(known, [], False)) == \
        {0: Path("runs/reg/dropout=0")}


# --------------------------------------------------------------------------- resume or fresh


def test_a_stopped_local_point_resumes_from_its_checkpoint():
    before = [run(0, "FINISHED", "r0", "hash-a"), run(1, "KILLED", "r1", "hash-b")]
    decisions = decide(facts(), before, False)
    # Only the point that runs has its folder looked at; the skipped one does not.
    assert checkpoint_folders(target(), facts(), decisions) == {1: Path("runs/reg/dropout=0.2")}
    last = Path("runs/reg/dropout=0.2/20260101-000000/last.pt")
    _, second = plan(before, {1: Resumable(last, "r1")})
    assert (second.action, second.resume_from, second.resume_run_id) == ("resume", last, "r1")
    assert second.command[-2:] == ("--resume", str(last))


def test_a_stopped_container_point_resumes_into_its_unfinished_run():
    before = [run(0, "KILLED", "older", "hash-a"), run(0, "RUNNING", "r0", "hash-a")]
    first, second = plan(before, containers=in_containers())
    assert (first.action, first.resume_run_id) == ("resume", "r0")
    assert first.checkpoints == "/app/runs/reg/hash-a"  # one folder per config
    args = first.command[first.command.index("train"):]
    assert args[args.index("--resume") + 1] == "auto"
    assert args[args.index("--out") + 1] == "/app/runs/reg/hash-a"
    # No run to continue, but the container may still find a checkpoint of its config.
    assert (second.action, second.resume_run_id) == ("fresh", None)
    assert "--resume" in second.command


def test_after_an_edit_to_the_base_a_stopped_point_starts_afresh():
    why = "not resuming runs/reg/dropout=0/a/last.pt: it was trained with another config"
    first, _ = plan([run(0, "KILLED", "r0", "hash-before-the-edit")],
                    {0: Resumable(None, None, why)})
    assert (first.action, first.resume_from, first.note) == ("fresh", None, why)
    assert "--resume" not in first.command
    first, _ = plan([run(0, "KILLED", "r0", "hash-before-the-edit")],
                    containers=in_containers())
    assert (first.action, first.resume_run_id) == ("fresh", None)
    assert first.checkpoints == "/app/runs/reg/hash-a"


# --------------------------------------------------------------------------- command and env


def test_a_local_point_command_and_environment():
    first, _ = plan(extra_args=("--quiet",))
    assert first.command == (
        "python", "-m", "tinytale", "train", "base.yaml", "--set", "train.epochs=2",
        "--set", "model.dropout=0.0", "--run-name", "dropout=0", "--experiment", "study",
        "--json", "--out", "runs/reg", "--tracking-uri", URI, "--quiet")
    assert first.log == Path("runs/reg/logs/dropout=0.log")
    assert first.checkpoints == "runs/reg/dropout=0"
    assert first.where == ""
    env = first.env
    assert env["TINYTALE_TEST_HOLD"] == "2:1"  # the sweep's environment passes through
    assert env["MLFLOW_TRACKING_URI"] == URI
    assert env["TINYTALE_PARENT_RUN_ID"] == "parent"
    assert json.loads(env["TINYTALE_RUN_TAGS"]) == {
        "tinytale.sweep": "reg", "tinytale.overrides": '{"model.dropout": 0.0}'}
    assert "OMP_NUM_THREADS" not in env  # one point at a time: it has every core


def test_points_side_by_side_share_the_cores():
    first, _ = plan(parallel=2)
    assert (first.env["OMP_NUM_THREADS"], first.env["MKL_NUM_THREADS"]) == ("4", "4")
    # Only points that run count: the other one is skipped.
    _, second = plan([run(0, "FINISHED", "r0", "hash-a")], parallel=4)
    assert second.env["OMP_NUM_THREADS"] == "8"
    first, _ = plan(parallel=2, environ={"OMP_NUM_THREADS": "3"})
    assert (first.env["OMP_NUM_THREADS"], first.env["MKL_NUM_THREADS"]) == ("3", "4")


def test_a_container_point_gets_the_sweep_as_env_options():
    first, _ = plan(containers=in_containers(), parallel=2, extra_args=("--quiet",))
    command = list(first.command)
    options = [command[i + 1] for i, arg in enumerate(command) if arg == "--env"]
    assert options[:1] == ["TINYTALE_PARENT_RUN_ID=parent"]
    assert options[2:] == ["OMP_NUM_THREADS=4", "MKL_NUM_THREADS=4"]
    assert command[command.index("trainer"):] == [
        "trainer", "train", "/app/launch/base.yaml", "--set", "train.epochs=2",
        "--set", "model.dropout=0.0", "--run-name", "dropout=0", "--experiment", "study",
        "--json", "--resume", "auto", "--out", "/app/runs/reg/hash-a", "--quiet"]
    assert "TINYTALE_PARENT_RUN_ID" not in first.env  # the host's compose gets only its own
    assert first.env["TINYTALE_TEST_HOLD"] == "2:1"
    assert first.where == " in a cpu container"


# --------------------------------------------------------------------------- reading it back


def test_the_summary_is_the_last_json_line_of_stdout():
    summary = parse_summary('starting\n{"run_id": "a"}\nnoise\n'
                            '{"run_id": "b", "status": "FINISHED", "best_epoch": 3}\n')
    assert (summary.run_id, summary.status, summary.best_epoch) == ("b", "FINISHED", 3)
    assert parse_summary("{not json\n") is None
    assert parse_summary("") is None


@pytest.mark.parametrize(("code", "status"), [
    (0, "FINISHED"), (130, "KILLED"), (143, "KILLED"), (-15, "KILLED"), (-2, "KILLED"),
    (1, "FAILED"), (-11, "FAILED"), (2, "FAILED")])
def test_exit_codes(code, status):
    assert status_of(code) == status


def test_an_outcome_reads_the_summary_and_for_a_failure_the_error_line(tmp_path):
    log = tmp_path / "p.log"
    log.write_text("\n==== 2026-01-01 00:00:00 train a.yaml\nerror: run failed: nan\n")
    summary = ('{"run_id": "r", "best_epoch": 2, "best_val_loss": 0.5, "diverged": true}\n')
    done = read_outcome(summary, 0, log)
    assert (done.status, done.run_id, done.best_epoch, done.best_val_loss, done.diverged,
            done.error) == ("FINISHED", "r", 2, 0.5, True, None)
    failed = read_outcome(summary, 1, log)
    assert (failed.status, failed.run_id, failed.error) == ("FAILED", "r", "run failed: nan")
    assert read_outcome("", 143, log).error is None  # the executor says who stopped it
