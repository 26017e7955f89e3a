"""System metrics (CPU, memory, GPU) sampled by MLflow's monitor and written to the spool."""

from __future__ import annotations

import contextlib
from typing import Any


def _system_monitor(sink: Any, interval: float, first_step: int, uri: str) -> Any:
    """MLflow's SystemMetricsMonitor, publishing into our spool instead of straight to MLflow."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class SpoolingSystemMetricsMonitor(SystemMetricsMonitor):
        def __init__(self) -> None:
            super().__init__(run_id=None, sampling_interval=interval, samples_before_logging=1,
                             tracking_uri=uri)
            self._logging_step = first_step
            self._unpublished = False

        def monitor(self) -> None:
            while not self._shutdown_event.is_set():
                with contextlib.suppress(Exception):
                    self.collect_metrics()
                    self._unpublished = True
                if self._shutdown_event.wait(self.sampling_interval):
                    break
                self._publish()

        def _publish(self) -> None:
            if self._unpublished:
                with contextlib.suppress(Exception):
                    self.publish_metrics(self.aggregate_metrics())
                self._unpublished = False

        def publish_metrics(self, metrics: dict[str, float]) -> None:
            prefix = self._metrics_prefix + (self.node_id + "/" if self.node_id else "")
            sink({prefix + k: v for k, v in metrics.items()}, self._logging_step)
            self._logging_step += 1
            for m in self.monitors:
                m.clear_metrics()

        def finish(self) -> None:
            if self._process is None:
                return
            self._shutdown_event.set()
            self._process.join(timeout=10)
            self._process = None
            self._publish()

    return SpoolingSystemMetricsMonitor()
