"""A first-come, first-served lock, so that no caller of a busy model waits forever."""

from __future__ import annotations

import itertools
import threading


class FairLock:
    """Callers get the lock in the order they asked for it; a waiting caller can give up."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._tickets = itertools.count()
        self._queue: list[int] = []
        self._held = False

    def acquire(self, cancel: threading.Event | None = None, poll: float = 0.05) -> bool:
        """Blocks until it is this caller's turn; returns False if `cancel` was set first."""
        with self._cond:
            ticket = next(self._tickets)
            self._queue.append(ticket)
            try:
                while self._held or self._queue[0] != ticket:
                    if cancel is not None and cancel.is_set():
                        return False
                    self._cond.wait(poll if cancel is not None else None)
                self._held = True
                return True
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            if not self._held:
                raise RuntimeError("release of an unheld FairLock")
            self._held = False
            self._cond.notify_all()

    def waiting(self) -> int:
        with self._cond:
            return len(self._queue)

    def __enter__(self) -> "FairLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
