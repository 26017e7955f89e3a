"""scripts/fault_injection.py, the drill the README points operators to, run as they run it.

One scenario (SIGKILL mid-epoch, then `--resume auto`) through the script's own command line:
its real server, processes and signal, and its report. The other scenarios' behaviour has tests
of its own (test_resume.py, test_outage.py); this keeps the script itself from rotting.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fault_injection.py"


@pytest.mark.slow
def test_sigkill_scenario_reports_every_epoch_once_and_the_model_version() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "sigkill-resume"], capture_output=True,
                          text=True, timeout=480, check=False)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    (row,) = json.loads(lines[-1])
    assert row["ok"] and row["runs"] == 1 and row["duplicates"] == 0, row
    assert row["epochs_logged"] == row["epochs_expected"] and row["model_version"], row
    assert "sigkill-resume: epochs 8/8, duplicates 0, runs 1 (FINISHED), model version yes" in (
        lines[0]
    )


def test_an_unknown_scenario_is_refused_with_the_list() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "sigkil"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert "scenarios are: sigkill-resume, sigterm-resume" in done.stderr
