"""The MLflow UI as a user meets it, in a real headless Chromium against a real server.

What is checked is what the README and the printed links promise: a run's page opens in Model
training mode on its per-epoch loss charts (no one-point summary charts), its samples show
as a table, the runs table's Dataset column names the corpus, the registered
model shows its `champion` alias, and a sweep's chart link draws every point's curves side by
side (not just the parent's). Needs Debian's `chromium` and `chromium-driver`
(scripts/test.sh installs them); without them the test skips, except under CI=true.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tinytale.mlflow_tracker.uris import sweep_charts_url

CHROMEDRIVER = shutil.which("chromedriver")
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOTS = Path(os.environ.get("TINYTALE_SCREENSHOTS", "")) if os.environ.get(
    "TINYTALE_SCREENSHOTS") else None

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (CHROMEDRIVER and BROWSER):
        if os.environ.get("CI") == "true":
            pytest.fail("chromium and chromium-driver are missing; scripts/test.sh installs them")
        pytest.skip("no chromium/chromedriver (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1600,1000"):
        options.add_argument(arg)
    # Service with the driver's path: Selenium Manager would try to download one otherwise.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


SCROLL_PANES = """
for (const el of document.querySelectorAll('*')) {
  if (el.scrollHeight > el.clientHeight + 10 && getComputedStyle(el).overflowY !== 'visible') {
    el.scrollTop = el.scrollTop + el.clientHeight * 0.8 >= el.scrollHeight - el.clientHeight
      ? 0 : el.scrollTop + el.clientHeight * 0.8;
  }
}
"""


def page_text(driver, url: str, until: list[str], timeout: float = 60.0) -> str:
    """Open `url` and wait until every string in `until` is on the page; return its text."""
    driver.get("about:blank")  # a hash-only change would not reload the app
    driver.get(url)
    deadline = time.monotonic() + timeout
    text = ""
    seen = ""
    while time.monotonic() < deadline:
        text = driver.find_element("tag name", "body").text
        seen += text
        if all(s in seen for s in until):
            break
        # The UI draws only the charts in view: scroll every scrolling pane a screen further.
        driver.execute_script(SCROLL_PANES)
        time.sleep(0.5)
    text = seen
    if SCREENSHOTS:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SCREENSHOTS / f"{len(list(SCREENSHOTS.iterdir())):02d}.png"))
    missing = [s for s in until if s not in text]
    assert not missing, f"{url} never showed {missing}; it showed:\n{text[:2000]}"
    return text


def tinytale(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = str(Path(sys.executable).with_name("tinytale"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    return subprocess.run([exe, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=240)


TINY_SET = ["--set", "model.n_layer=1", "--set", "model.n_embd=16", "--set",
            "model.block_size=16", "--set", "train.epochs=3", "--set", "train.batch_size=8",
            "--set", "train.warmup_steps=2", "--set", "tracking.samples=1"]


def test_run_page_model_registry_and_sweep_charts(browser, mlflow_server, tmp_path):
    uri = mlflow_server.url
    trained = tinytale("train", *TINY_SET, "--experiment", "browser", "--tracking-uri", uri,
                       "--out", str(tmp_path / "runs"), "--json", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    summary = json.loads(trained.stdout.strip().splitlines()[-1])

    # The printed link: Model training mode, the per-epoch curves, no one-point charts.
    text = page_text(browser, summary["run_url"], ["Model metrics", "train_loss", "val_loss",
                                                   "val_perplexity", "tokens_per_sec"])
    assert "Model training" in text and "lr" in text.split()
    charts = text[text.index("Model metrics"):]
    for summary_metric in ("best_val_loss", "best_epoch", "\nepochs\n"):
        assert summary_metric not in charts, f"{summary_metric!r} is charted again"

    # The samples logged per epoch, drawn by the UI as a table (mlflow.log_table).
    run_page = summary["run_url"].split("/model-metrics")[0]
    table = json.loads(Path(MlflowClient(uri).download_artifacts(
        summary["run_id"], "samples.json", str(tmp_path))).read_text())
    texts = [row[table["columns"].index("text")] for row in table["data"]]
    shown = next(t for t in texts if t)[:40]  # the UI wraps long cells; a prefix is on one line
    page_text(browser, f"{run_page}/artifacts/samples.json?workflowType=machine_learning",
              ["samples.json", "epoch", "temperature", "val_loss", shown])

    # The runs table's Dataset column names the corpus and its digest.
    experiment_id = summary["run_url"].split("/#/experiments/")[1].split("/")[0]
    inputs = MlflowClient(uri).get_run(summary["run_id"]).inputs.dataset_inputs
    digest = inputs[0].dataset.digest
    page_text(browser, f"{uri}/#/experiments/{experiment_id}/runs?workflowType=machine_learning",
              ["Dataset", f"lesson.train ({digest}"])

    # The registered model's page lists its versions and the champion alias.
    model = summary["registered_model"]
    page_text(browser, f"{uri}/#/models/{model}?workflowType=machine_learning",
              [model, "champion", f"Version {summary['registered_version']}"])

    # A sweep's chart link: both points listed flat, both drawn in the val_loss chart.
    (tmp_path / "sweep.yaml").write_text(
        "name: browser-sweep\nbase: lesson.yaml\nexperiment: browser\n"
        "set: {model.n_layer: 1, model.n_embd: 16, model.block_size: 16, train.epochs: 2,"
        " train.batch_size: 8, train.warmup_steps: 2, tracking.samples: 0,"
        " tracking.register: false}\n"
        "grid:\n  model.dropout: [0.0, 0.1]\n")
    shutil.copy(Path(__file__).resolve().parents[2] / "experiments" / "lesson.yaml", tmp_path)
    swept = tinytale("sweep", "sweep.yaml", "--tracking-uri", uri, "--out",
                     str(tmp_path / "runs"), cwd=tmp_path)
    assert swept.returncode == 0, swept.stderr + swept.stdout
    link = sweep_charts_url(uri, experiment_id, "browser-sweep")
    assert f"every point's curves: {link}" in swept.stdout
    page_text(browser, link, ["dropout=0 (val_loss)", "dropout=0.1 (val_loss)",
                              "2 matching runs"])
