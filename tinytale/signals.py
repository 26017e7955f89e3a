"""SIGINT and SIGTERM as requests to stop: handlers installed for as long as a run lasts.

`tinytale train` (checkpoint, then stop) and `tinytale sweep` (stop the running points) both
use `on_stop_signals`; what a stop means is theirs to say.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def on_stop_signals(handler: Callable[[str], None]) -> Iterator[None]:
    """Call `handler` with the signal's name ("SIGINT", "SIGTERM") when one arrives inside the
    block; the handlers from before are back after it. Python sets handlers only in the main
    thread: elsewhere this installs nothing."""

    def on_signal(signum: int, _frame: Any) -> None:
        handler(signal.Signals(signum).name)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
