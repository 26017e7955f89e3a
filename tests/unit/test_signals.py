"""SIGINT/SIGTERM inside `on_stop_signals` reach the handler by name; the old handlers return."""

import os
import signal
import threading

from tinytale.signals import on_stop_signals


def test_a_real_signal_reaches_the_handler_and_the_old_handlers_come_back():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    received = []
    with on_stop_signals(received.append):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
    assert received == ["SIGTERM", "SIGINT"]
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_outside_the_main_thread_nothing_is_installed():
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def run() -> None:
        with on_stop_signals(print):
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [before]
