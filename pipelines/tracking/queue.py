"""The offline queue: a tracker's calls, sent in order, held while MLflow cannot be reached.

Every logging call becomes a `Call`, sent at once while MLflow answers; MLflow's own HTTP client
retries a failed request a few times first (backend.configure_http: `retries`, `timeout_sec`;
a SQLite store waits out a locked file itself). A call that still fails for a transient reason
(no connection, timeout, server overload, a locked database) stays queued with every call after
it: the queue is "offline" for `offline_retry_sec`, during which calls only queue (no network
wait at all); then the next call asks the server once whether it answers (one request, no
retries, at most `timeout_sec`) and, when it does, sends the queue in order, so metrics, the
config and the model arrive as if nothing had happened. `flush(final=True)` (the run's end)
sends without asking first. A call that fails for any other reason (a refused value, a deleted
experiment) is dropped with a warning at once; a refused run creation drops the whole queue
(`dead`: that run logs nothing). The queue holds at most MAX_PENDING_CALLS calls; beyond that
new calls are dropped (counted by kind, one warning); `unsent()` counts what never went out.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable

from pipelines.tracking.backend import is_transient

MAX_PENDING_CALLS = 10_000
_log = logging.getLogger(__name__)


@dataclass
class Call:
    what: str  # named in warnings; its first word counts unsent calls by kind
    send: Callable[[], None]
    creates_run: bool = False


class CallQueue:
    """One run's calls. `reachable()` asks the server (one short request); `warn` reports to the user.
    Not thread-safe, as the tracker that owns it."""

    def __init__(self, run_name: str, offline_retry_sec: float, reachable: Callable[[], bool],
                 warn: Callable[[str], None]):
        self.uri = ""  # where the calls go, named in warnings; set once resolved
        self.pending: deque[Call] = deque()
        self.dead = False  # the run could not be created (or MLflow did not import): nothing more is sent
        self._run_name = run_name
        self._offline_retry_sec = offline_retry_sec
        self._reachable = reachable
        self._warn = warn
        self._offline_until: float | None = None  # time.monotonic() of the next try; None: online
        self._overflow: Counter[str] = Counter()  # calls dropped because the queue was full, by kind

    def submit(self, call: Call) -> None:
        """Queue `call` and, unless offline for a while yet, send the queue."""
        if len(self.pending) >= MAX_PENDING_CALLS:
            if not self._overflow:
                self._warn(f"{MAX_PENDING_CALLS} calls are queued for an unreachable {self.uri}; dropping new ones")
            self._overflow[call.what.split()[0]] += 1
            return
        self.pending.append(call)
        if self._offline_until is None or time.monotonic() >= self._offline_until:
            self.flush()

    def flush(self, final: bool = False) -> bool:
        """Send queued calls in order; False when one still fails (it and those after it stay)."""
        was_offline = self._offline_until is not None
        if was_offline and not final and not self._reachable():  # one short question, not the retries of a call
            self._offline_until = time.monotonic() + self._offline_retry_sec
            return False
        sent = 0
        while self.pending and not self.dead:
            call = self.pending[0]
            err = _send(call)
            if err is not None and is_transient(err):
                if not was_offline:
                    self._warn(f"cannot reach {self.uri} ({type(err).__name__}: {err}); {len(self.pending)} call(s) "
                               f"queued, next try in {self._offline_retry_sec:g} s; training goes on")
                self._offline_until = time.monotonic() + self._offline_retry_sec
                return False
            self.pending.popleft()
            if err is None:
                sent += 1
            elif call.creates_run:
                self._warn(f"no run: {call.what} was refused ({type(err).__name__}: {err}); "
                           f"this run logs nothing ({len(self.pending)} queued call(s) dropped)")
                self.dead = True
                self.pending.clear()
            else:
                self._warn(f"{call.what} was refused and is dropped: {type(err).__name__}: {err}")
        if was_offline:
            _log.warning("lofi tracking (%s): %s reachable again; sent %d queued call(s)", self._run_name, self.uri, sent)
            self._offline_until = None
        return True

    def unsent(self) -> Counter[str]:
        """Calls never sent, by kind: dropped for a full queue, or still queued."""
        return self._overflow + Counter(call.what.split()[0] for call in self.pending)

    def clear(self) -> None:
        self.pending.clear()


def _send(call: Call) -> Exception | None:
    """None when sent; else the error (MLflow has retried what it retries)."""
    try:
        call.send()
    except Exception as err:
        return err
    return None
