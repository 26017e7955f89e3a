"""`tinytale compare`: the pure curve rules on hand-made curves, the table/JSON/plot rendering,
and the whole command against a real MLflow server holding hand-written runs."""

from __future__ import annotations

import json
import math
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.server import free_port
from typer.testing import CliRunner

from tinytale import compare as cmp
from tinytale.cli import app
from tinytale.errors import UserError

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def series(*values: float, start: int = 1) -> list[tuple[int, float]]:
    return [(start + i, v) for i, v in enumerate(values)]


# --------------------------------------------------------------------------- best epoch


def test_best_epoch_is_the_lowest_value():
    assert cmp.best_epoch(series(3.0, 2.0, 1.5, 1.7, 1.9)) == (3, 1.5)


def test_best_epoch_takes_the_first_of_equal_minima():
    assert cmp.best_epoch(series(2.0, 1.0, 1.0, 1.2)) == (2, 1.0)


def test_best_epoch_ignores_nan_and_inf():
    assert cmp.best_epoch(series(2.0, math.nan, -math.inf, 1.5)) == (4, 1.5)


def test_best_epoch_of_nothing_is_none():
    assert cmp.best_epoch([]) is None
    assert cmp.best_epoch(series(math.nan, math.inf)) is None


# --------------------------------------------------------------------------- onset


def test_onset_of_a_clean_u_is_its_minimum():
    val = series(3.0, 2.0, 1.5, 1.2, 1.1, 1.15, 1.2, 1.3, 1.4)
    assert cmp.overfit_onset(val, patience=3) == 5 == cmp.best_epoch(val)[0]


def test_no_onset_while_the_loss_keeps_falling():
    assert cmp.overfit_onset(series(3.0, 2.5, 2.0, 1.8, 1.7, 1.65), patience=3) is None


def test_a_noisy_descent_has_no_onset_on_its_upticks():
    # Three rising epochs on the way down (what a small batch or dropout does to a curve) are
    # not memorisation: the loss later falls far below them. It ends at its best: no onset.
    val = series(3.0, 2.6, 2.7, 2.8, 2.9, 2.2, 2.3, 2.4, 2.5, 1.8, 1.9, 2.0, 2.1, 1.5, 1.4)
    assert cmp.overfit_onset(val, patience=3) is None
    # Its lowest point a few epochs before the end, then wobbles within 2%: still no onset.
    val = series(3.0, 2.6, 2.7, 2.8, 2.9, 1.5, 1.6, 1.7, 1.8, 1.00, 1.01, 1.015, 1.012, 1.019)
    assert cmp.overfit_onset(val, patience=3) is None


def test_a_descent_that_later_turns_up_has_its_onset_at_the_minimum_not_an_early_uptick():
    val = series(3.0, 2.0, 2.1, 2.2, 2.3, 1.0, 1.1, 1.2, 1.3)
    assert cmp.overfit_onset(val, patience=3) == 6 == cmp.best_epoch(val)[0]


def test_a_short_rise_is_not_an_onset():
    # Clearly above the minimum for two epochs only: with patience 3 the run may still recover.
    val = series(3.0, 2.0, 1.0, 1.5, 1.6)
    assert cmp.overfit_onset(val, patience=3) is None
    assert cmp.overfit_onset(val, patience=2) == 3
    assert cmp.overfit_onset(val, patience=1) == 3


def test_a_plateau_is_not_a_rise():
    flat = series(3.0, 2.0, 1.0, 1.01, 0.995, 1.005, 1.0, 1.012, 0.999, 1.01, 1.008)
    assert cmp.overfit_onset(flat, patience=3) is None
    assert cmp.overfit_onset(flat, patience=3, margin=0.0) == 5  # any rise at all counts


def test_the_rise_must_clear_the_margin_every_epoch():
    # 2% above 1.0 is 1.02: the third epoch at exactly 1.02 is not above it.
    assert cmp.overfit_onset(series(2.0, 1.0, 1.03, 1.04, 1.02), patience=3) is None
    assert cmp.overfit_onset(series(2.0, 1.0, 1.03, 1.04, 1.021), patience=3) == 2


def test_on_a_flat_bottom_the_onset_is_its_last_epoch():
    val = series(2.0, 1.0, 1.0, 1.0, 1.5, 1.6, 1.7)
    assert cmp.best_epoch(val) == (2, 1.0)
    assert cmp.overfit_onset(val, patience=3) == 4


def test_a_curve_that_comes_back_to_its_minimum_starts_over_from_there():
    val = series(3.0, 1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 4.0)
    assert cmp.best_epoch(val) == (2, 1.0)
    assert cmp.overfit_onset(val, patience=3) == 5


def test_nan_breaks_a_run_of_epochs_above_the_minimum():
    assert cmp.overfit_onset(series(1.0, 0.5, 0.6, math.nan, 0.7, 0.8), patience=3) is None
    assert cmp.overfit_onset(series(1.0, 0.5, 0.6, math.nan, 0.7, 0.8, 0.9), patience=3) == 2
    assert cmp.overfit_onset(series(math.nan, math.inf)) is None
    assert cmp.overfit_onset([]) is None


def test_onset_uses_the_logged_epochs_when_some_are_missing():
    val = [(10, 1.0), (20, 0.8), (30, 0.9), (40, 1.0), (50, 1.1)]
    assert cmp.overfit_onset(val, patience=3) == 20


def test_onset_needs_positive_patience():
    with pytest.raises(ValueError):
        cmp.overfit_onset(series(1.0, 2.0), patience=0)


@given(st.lists(st.floats(0.0, 5.0, allow_nan=False), max_size=40), st.integers(1, 5))
def test_onset_is_never_before_the_best_epoch(values, patience):
    curve = series(*values)
    onset = cmp.overfit_onset(curve, patience)
    if onset is None:
        return
    low = values[onset - 1]
    assert low == min(values) and onset >= cmp.best_epoch(curve)[0]
    later = values[onset:]
    assert all(v > low for v in later)  # it never got back to its best ...
    clear = [v > low * 1.02 for v in later]  # ... and stayed clearly above for `patience`
    assert any(all(clear[i:i + patience]) for i in range(len(clear) - patience + 1))


# --------------------------------------------------------------------------- gap, cleaning


def test_final_gap_is_val_minus_train_at_the_last_common_epoch():
    train = series(2.0, 1.0, 0.5, 0.2)
    val = series(2.1, 1.4, 1.2)  # validation of epoch 4 is missing
    assert cmp.final_gap(train, val) == pytest.approx(1.2 - 0.5)
    assert cmp.final_gap([], val) is None


def test_clean_series_sorts_and_keeps_the_last_value_of_an_epoch():
    assert cmp.clean_series([(2, 1.0), (1, 2.0), (2, 0.5)]) == [(1, 2.0), (2, 0.5)]


def test_train_metric_twin():
    assert cmp.train_metric_for("val_loss") == "train_loss"
    assert cmp.train_metric_for("val_perplexity") == "train_perplexity"
    assert cmp.train_metric_for("grad_norm") is None


# --------------------------------------------------------------------------- summaries


OVERFIT_VAL = [3.0, 2.0, 1.2, 0.9, 0.8, 0.85, 0.9, 1.0, 1.1]
OVERFIT_TRAIN = [3.0, 1.8, 1.0, 0.6, 0.4, 0.3, 0.2, 0.15, 0.1]
REGULAR_VAL = [3.0, 2.2, 1.5, 1.1, 0.9, 0.8, 0.75, 0.74, 0.76]
REGULAR_TRAIN = [3.1, 2.1, 1.4, 1.0, 0.8, 0.7, 0.65, 0.6, 0.58]


def make_run(run_id, name, val, train, **kw):
    return cmp.RunCurves(run_id, name, histories={
        "val_loss": series(*val), "train_loss": series(*train),
        "val_perplexity": series(*(math.exp(v) for v in val)),
        "train_perplexity": series(*(math.exp(v) for v in train))}, **kw)


def test_summary_of_an_overfitting_run():
    run = make_run("a" * 32, "overfit", OVERFIT_VAL, OVERFIT_TRAIN,
                   latest={"tokens_per_sec": 1234.5})
    s = cmp.summarize(run, "val_loss", 3)
    assert (s.best_epoch, s.best_val_loss, s.overfit_onset) == (5, 0.8, 5)
    assert s.best_val_perplexity == pytest.approx(math.exp(0.8))
    assert s.final_gap == pytest.approx(1.0)
    assert s.tokens_per_sec == 1234.5


def test_summary_by_another_metric_reports_val_loss_at_its_best_epoch():
    run = make_run("b" * 32, "regularized", REGULAR_VAL, REGULAR_TRAIN)
    s = cmp.summarize(run, "val_perplexity", 3)
    assert s.best_epoch == 8 and s.best_val_loss == 0.74
    assert s.best_metric_value == pytest.approx(math.exp(0.74))
    assert s.overfit_onset is None


def test_summary_of_a_run_without_history():
    s = cmp.summarize(cmp.RunCurves("c" * 32, "failed", status="FAILED"))
    assert s.best_epoch is None and s.best_val_loss is None and s.final_gap is None
    assert json.loads(cmp.render_json([s]))[0]["best_val_perplexity"] is None


def test_rows_show_differing_params_when_runs_carry_no_overrides():
    common = {"model.n_layer": "4", "tracking.run_name": "x", "train.device": "cpu"}
    a = make_run("a" * 32, "a", OVERFIT_VAL, OVERFIT_TRAIN,
                 params={**common, "model.dropout": "0.0", "train.num_threads": "1"})
    b = make_run("b" * 32, "b", REGULAR_VAL, REGULAR_TRAIN,
                 params={**common, "model.dropout": "0.2", "train.num_threads": "2",
                         "tracking.run_name": "y"})
    rows = cmp.summarize_all([a, b])
    assert [r.overrides for r in rows] == [{"model.dropout": 0.0}, {"model.dropout": 0.2}]


def test_format_overrides_shortens_keys_unless_they_collide():
    assert cmp.format_overrides({"model.dropout": 0.2, "train.weight_decay": 0.0}) == \
        "dropout=0.2,weight_decay=0"
    assert cmp.format_overrides({"data.seed": 1, "train.seed": 2}) == "data.seed=1,train.seed=2"
    assert cmp.format_overrides({"model.bias": False, "train.lr": 3e-4}) == \
        "bias=false,lr=0.0003"


def test_table_and_json_rendering():
    rows = cmp.summarize_all([
        make_run("a" * 32, "overfit", OVERFIT_VAL, OVERFIT_TRAIN,
                 overrides={"model.dropout": 0.0}, latest={"tokens_per_sec": 20000.0}),
        make_run("b" * 32, "regularized", REGULAR_VAL, REGULAR_TRAIN,
                 overrides={"model.dropout": 0.2}),
    ])
    table = cmp.render_table(rows).splitlines()
    assert table[0].split() == list(cmp.TABLE_COLUMNS)
    assert table[2].split() == ["overfit", "dropout=0", "5", "0.8000", "2.226", "+1.0000", "5",
                                "20,000"]
    assert table[3].split()[-2:] == ["none", "-"]
    data = json.loads(cmp.render_json(rows))
    assert list(data[0])[:len(cmp.JSON_KEYS)] == list(cmp.JSON_KEYS)
    assert data[1]["overfit_onset"] is None and data[1]["best_epoch"] == 8


# --------------------------------------------------------------------------- plot


def png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def svg_texts(path: Path) -> list[str]:
    """Every text element of an SVG figure, as a reader (or a screen reader) gets it."""
    root = ET.parse(path).getroot()
    return ["".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text")]


def test_plot_writes_png_and_svg(tmp_path):
    runs = [make_run("a" * 32, "overfit", OVERFIT_VAL, OVERFIT_TRAIN,
                     overrides={"model.dropout": 0.0}),
            make_run("b" * 32, "regularized", REGULAR_VAL, REGULAR_TRAIN),
            cmp.RunCurves("c" * 32, "no-history", status="FAILED")]
    rows = cmp.summarize_all(runs)
    png = cmp.plot_curves(runs, rows, tmp_path / "curves.png")
    assert png_size(png) == (1000, 650)
    assert png.stat().st_size > 20_000
    svg = cmp.plot_curves(runs, rows, tmp_path / "sub" / "curves.svg")
    assert svg.read_text().lstrip().startswith("<?xml")
    # Legible: title, axis labels and one legend entry per run are text, not glyph outlines.
    texts = svg_texts(svg)
    assert "Train vs validation loss per epoch (3 runs)" in texts
    assert "epoch" in texts and "loss (train dashed, validation solid)" in texts
    assert [t for t in texts if t in ("overfit [dropout=0]", "regularized", "no-history")] == \
        ["overfit [dropout=0]", "regularized", "no-history"]
    assert {"train loss", "validation loss", "best validation epoch"} <= set(texts)


def test_a_figure_that_cannot_be_written_is_a_user_error(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    runs = [make_run("a" * 32, "overfit", OVERFIT_VAL, OVERFIT_TRAIN)]
    with pytest.raises(UserError, match=r"^cannot write the figure '.*c\.png' \("):
        cmp.plot_curves(runs, cmp.summarize_all(runs), tmp_path / "a-file" / "c.png")


def test_plot_of_many_runs_puts_the_legend_outside(tmp_path):
    runs = [make_run(f"{i:032x}", f"run-{i}", [v + i * 0.01 for v in OVERFIT_VAL],
                     OVERFIT_TRAIN) for i in range(30)]
    png = cmp.plot_curves(runs, cmp.summarize_all(runs), tmp_path / "many.png")
    assert png_size(png) == (1300, 650)


# --------------------------------------------------------------------------- against MLflow


@pytest.fixture(scope="module")
def store(mlflow_server):
    """A sweep written straight into the server: parent + 2 point runs + one plain run."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.url)
    exp = client.create_experiment("compare-test")
    parent = client.create_run(exp, run_name="reg",
                               tags={"tinytale.sweep_parent": "reg"}).info.run_id
    # An earlier, failed run of the first point: `--sweep` shows the newest run of a point.
    old = client.create_run(exp, run_name="dropout=0", start_time=1000, tags={
        "tinytale.sweep": "reg", "mlflow.parentRunId": parent,
        "tinytale.overrides": json.dumps({"model.dropout": 0.0})})
    client.set_terminated(old.info.run_id, "FAILED")
    ids = {}
    for name, val, train, dropout in (("dropout=0", OVERFIT_VAL, OVERFIT_TRAIN, 0.0),
                                      ("dropout=0.2", REGULAR_VAL, REGULAR_TRAIN, 0.2)):
        run = client.create_run(exp, run_name=name, tags={
            "tinytale.sweep": "reg", "mlflow.parentRunId": parent,
            "tinytale.overrides": json.dumps({"model.dropout": dropout})})
        metrics = []
        for epoch, (v, t) in enumerate(zip(val, train, strict=True), 1):
            metrics += [Metric("val_loss", v, 1000 + epoch, epoch),
                        Metric("train_loss", t, 1000 + epoch, epoch),
                        Metric("val_perplexity", math.exp(v), 1000 + epoch, epoch),
                        Metric("train_perplexity", math.exp(t), 1000 + epoch, epoch),
                        Metric("tokens_per_sec", 5000.0 + epoch, 1000 + epoch, epoch)]
        client.log_batch(run.info.run_id, metrics=metrics,
                         params=[Param("model.dropout", str(dropout)),
                                 Param("model.n_layer", "4")])
        client.set_terminated(run.info.run_id, "FINISHED")
        ids[name] = run.info.run_id
    client.set_terminated(parent, "FINISHED")
    return {"url": mlflow_server.url, "parent": parent, "ids": ids, "client": client}


def test_compare_sweep_writes_figure_table_and_logs_to_parent(store, tmp_path):
    out = tmp_path / "curves.png"
    result = runner.invoke(app, ["compare", "--sweep", "reg", "--tracking-uri", store["url"],
                                 "--out", str(out), "--svg", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["run_name"] for r in rows] == ["dropout=0", "dropout=0.2"]
    over, reg = rows
    assert over["run_id"] == store["ids"]["dropout=0"]
    assert (over["best_epoch"], over["best_val_loss"], over["overfit_onset"]) == (5, 0.8, 5)
    assert over["final_gap"] == pytest.approx(1.0)
    assert over["best_val_perplexity"] == pytest.approx(math.exp(0.8))
    assert over["tokens_per_sec"] == 5009.0  # the latest value
    assert (reg["best_epoch"], reg["overfit_onset"]) == (8, None)
    assert reg["overrides"] == {"model.dropout": 0.2}
    assert png_size(out) == (1000, 650) and out.stat().st_size > 20_000
    texts = svg_texts(tmp_path / "curves.svg")
    assert "Sweep 'reg': train vs validation loss" in texts
    assert "epoch" in texts and "loss (train dashed, validation solid)" in texts
    assert {"dropout=0", "dropout=0.2"} <= set(texts)  # one legend entry per run
    logged = {a.path for a in store["client"].list_artifacts(store["parent"], "compare")}
    assert logged == {"compare/curves.png", "compare/curves.svg"}


def test_compare_by_name_and_id_prints_a_table(store, tmp_path):
    result = runner.invoke(app, [
        "compare", "dropout=0.2", store["ids"]["dropout=0"], "--experiment", "compare-test",
        "--tracking-uri", store["url"], "--out", str(tmp_path / "c.png"),
        "--metric", "val_perplexity", "--patience", "2"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == list(cmp.TABLE_COLUMNS)
    assert [line.split()[0] for line in lines[2:]] == ["dropout=0.2", "dropout=0"]
    reg, over = (line.split() for line in lines[2:])
    assert (reg[2], reg[6]) == ("8", "none")  # 0.74 -> 0.76 is one rise, patience is 2
    assert (over[2], over[6]) == ("5", "5")


def test_compare_experiment_alone_skips_sweep_parents(store, tmp_path):
    result = runner.invoke(app, ["compare", "--experiment", "compare-test", "--json",
                                 "--tracking-uri", store["url"],
                                 "--out", str(tmp_path / "c.png")])
    assert result.exit_code == 0, result.output
    assert {r["run_name"] for r in json.loads(result.stdout)} == {"dropout=0", "dropout=0.2"}


@pytest.mark.parametrize("args, message", [
    (["--sweep", "nope"], "no runs of sweep 'nope'"),
    (["--experiment", "missing"], "experiment 'missing' does not exist"),
    (["no-such-run", "--experiment", "compare-test"], "no run with id or name 'no-such-run'"),
    (["--sweep", "reg", "--metric", "bleu"], "none of the 2 runs logged the metric 'bleu'"),
    (["--sweep", "reg", "--out", "x.jpg"], "must end in .png or .svg"),
    (["--sweep", "reg", "--out", "{tmp}/a-file/sub/c.png"],
     "--out '{tmp}/a-file/sub/c.png': '{tmp}/a-file' is a file, not a folder; pass a path in a "
     "folder you can write to."),
    (["--sweep", "reg", "--out", "{tmp}/dir.png"], "--out '{tmp}/dir.png' is a folder"),
    ([], "nothing to compare"),
])
def test_compare_mistakes_exit_2_with_one_line(store, tmp_path, args, message):
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "dir.png").mkdir()
    args = [a.format(tmp=tmp_path) for a in args]
    result = runner.invoke(app, ["compare", *args, "--tracking-uri", store["url"]])
    assert result.exit_code == 2, result.output
    assert message.format(tmp=tmp_path) in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output


# --------------------------------------------------------------------------- server trouble


def test_compare_against_an_unreachable_server_is_one_sentence(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = runner.invoke(app, ["compare", "--sweep", "reg", "--tracking-uri", uri,
                                 "--out", str(tmp_path / "c.png")])
    assert result.exit_code == 2, result.output
    assert result.stderr == (f"error: cannot reach the MLflow server at {uri}; start it "
                             "(`docker compose up -d mlflow`, or `mlflow server`) or pass its "
                             "address with --tracking-uri.\n")


@pytest.mark.parametrize(("host", "refusal", "fix"), [
    ("127.0.0.1", "requires a login and none was given (HTTP 401)", "MLFLOW_TRACKING_USERNAME"),
    ("localhost", "refuses the Host header", "allowed hosts"),
])
def test_compare_refused_by_the_server_is_one_sentence(refusing_server, no_credentials,
                                                       tmp_path, host, refusal, fix):
    uri = f"http://{host}:{refusing_server}"
    result = runner.invoke(app, ["compare", "--sweep", "reg", "--tracking-uri", uri,
                                 "--out", str(tmp_path / "c.png")])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: MLflow at {uri} {refusal}")
    assert result.stderr.count("\n") == 1 and fix in result.stderr


# --------------------------------------------------------------------------- the shipped story


@pytest.mark.slow
def test_shipped_experiments_tell_the_overfitting_story(tmp_path):
    """The four points of sweep_regularization.yaml as shipped (overfit.yaml is the first,
    regularized.yaml the last): the unregularised model's validation loss has a minimum, then
    rises while training loss keeps falling; each lever moves the curve where the README says,
    so no curve of the figure hides another."""
    from tinytale.config import load_config
    from tinytale.run import train_run
    from tinytale.sweep import load_sweep
    from tinytale.tracking import Tracker

    class Collect(Tracker):
        def __init__(self):
            self.histories = {"val_loss": [], "train_loss": []}

        def log_metrics(self, metrics, step):
            for key, points in self.histories.items():
                if key in metrics:
                    points.append((step, metrics[key]))

    def same_run(a, b):  # the same training, whatever the run is called and samples
        ignore = {"tracking.run_name": "", "tracking.samples": 0}
        return {**a.flat(), **ignore} == {**b.flat(), **ignore}

    spec = load_sweep(REPO / "experiments" / "sweep_regularization.yaml")
    runs = {}
    for point in spec.points:
        overrides = [f"{k}={v}" for k, v in {**spec.common, **point.overrides}.items()]
        config = load_config(spec.base, [*overrides, "tracking.samples=0"])
        tracker = Collect()
        train_run(config, tmp_path, tracker)
        key = (config.model.dropout > 0, config.train.weight_decay > 0)
        runs[key] = config, cmp.summarize(cmp.RunCurves(point.run_name, point.run_name,
                                                         histories=tracker.histories)), tracker
    assert sorted(runs) == [(False, False), (False, True), (True, False), (True, True)]
    shipped = REPO / "experiments"
    assert same_run(runs[False, False][0], load_config(shipped / "overfit.yaml"))
    assert same_run(runs[True, True][0], load_config(shipped / "regularized.yaml"))

    for config, summary, tracker in runs.values():  # the margins, with pytest -s
        print(f"dropout {config.model.dropout} weight decay {config.train.weight_decay}: best "
              f"epoch {summary.best_epoch}, best val {summary.best_val_loss:.4f}, final val "
              f"{tracker.histories['val_loss'][-1][1]:.4f}")
    over, tracker = runs[False, False][1:]
    val, train = tracker.histories["val_loss"], tracker.histories["train_loss"]
    assert over.overfit_onset == over.best_epoch and 10 <= over.best_epoch <= 60
    assert val[-1][1] > over.best_val_loss + 0.2  # it rises after the minimum ...
    assert train[-1][1] < dict(train)[over.best_epoch] - 0.1  # ... while train keeps falling

    def final(key):
        return runs[key][2].histories["val_loss"][-1][1]

    def best(key):
        return runs[key][1].best_val_loss

    # Dropout lowers the minimum and delays it; weight decay caps the climb after it, alone
    # and on top of dropout; both together are best.
    for decay in (False, True):
        assert best((True, decay)) < best((False, decay)) - 0.05
        assert runs[True, decay][1].best_epoch > runs[False, decay][1].best_epoch
    for dropout in (False, True):
        assert final((dropout, True)) < final((dropout, False)) - 0.05
    assert best((True, True)) == min(best(key) for key in runs)
    assert final((True, True)) == min(final(key) for key in runs)
