"""Stopping a training cleanly on Ctrl-C or SIGTERM (what a job scheduler or ``kill`` sends).

A first signal lets the current step finish: the trainer writes a checkpoint at that step
boundary and raises :class:`Interrupted` (the CLI exits 130, or 143 for SIGTERM); a second
one stops at once.
"""

from __future__ import annotations

import signal
import threading


class Interrupted(KeyboardInterrupt):
    """Training stopped by a signal; ``signum`` is ``signal.SIGINT`` (Ctrl-C) or ``signal.SIGTERM``.

    A ``KeyboardInterrupt``, so code that handles Ctrl-C handles SIGTERM alike.
    """

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class InterruptGuard:
    """SIGINT and SIGTERM handler for the duration of training (a context manager): the
    first signal sets :attr:`requested`, which the loop checks between steps (so the
    checkpoint is of a consistent state), and records which signal it was in
    :attr:`signum`; a second one raises :class:`Interrupted` at once. Signal handlers can
    only be set in the main thread; elsewhere the signals keep their handlers."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signum = signal.SIGINT
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise Interrupted(signum)
        self.requested, self.signum = True, signum

    def request(self, signum: int) -> None:
        """Ask for the stop a signal would (another rank of a distributed training was signalled)."""
        if not self.requested:
            self.requested, self.signum = True, signum

    def check(self) -> None:
        """Raise :class:`Interrupted` if a signal came; call at step boundaries only."""
        if self.requested:
            raise Interrupted(self.signum)

    @property
    def name(self) -> str:
        """The signal's name ("SIGINT", "SIGTERM") for messages."""
        return signal.Signals(self.signum).name

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}
        return False
