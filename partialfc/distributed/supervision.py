"""Which rank a failed or stalled job waited for, told in one line.

A collective that times out (gloo: "Timed out waiting 300000ms for recv operation")
or is cut off by a peer that died ("Connection closed by peer") names the operation,
never the rank that did not arrive. So every rank keeps one key in the c10d store
that torchrun's rendezvous already runs (the agent's store, or the one rank 0 hosts):

    <prefix>/state/<rank> = "beat <step> <unix time>"       training; written between steps,
                                                             at most every HEARTBEAT_SECONDS
                          | "ended <step> <unix time>"      a collective failed here; alive
                          | "failed <unix time> <message>"  stopped on its own error

The heartbeat is written by the main thread from the step loop, never by a thread of
its own: a rank that is stopped (SIGSTOP), hung in its data loader or stuck in a
kernel must stop beating -- that is what makes it recognisable. When a collective
fails, each surviving rank marks itself "ended", gives the others ``grace_seconds`` to
do the same, then reads every state: a rank that "failed" is named as the cause, with
its message (on a multi-node job its own line is in another node's log); a rank still
at "beat" is the one that stopped answering.

NCCL: a timed-out NCCL collective does not return to Python; the watchdog aborts the
communicator and tears the process down (TORCH_NCCL_ASYNC_ERROR_HANDLING's default)
with a C++ report that names no peer. With NCCL a watch thread (``watch=True``)
therefore makes the diagnosis itself: when this rank has finished no step for the
collective timeout, or a peer has published its failure, it prints the line and ends
the process. The runtime sets the group's own timeout a margin later, so the watchdog
acts only if this thread cannot.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch.distributed as dist

HEARTBEAT_SECONDS = 2.0
"""At most one heartbeat write per this many seconds (one store round trip)."""
GRACE_SECONDS = 5.0
"""How long a rank whose collective failed waits for the other survivors to say so."""
STORE_TIMEOUT_SECONDS = 10.0
"""Store reads during a diagnosis: the store's host may be the rank that stopped."""
EXIT_CODE = 3
"""Exit status of a rank that stopped because of another rank (2: its own bad input)."""

_COLLECTIVE_MARKERS = ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer",
                       "Timed out waiting", "Broken pipe")


def is_collective_failure(exc: BaseException) -> bool:
    """True for the errors a collective raises when a peer is gone or late.

    gloo raises plain ``RuntimeError`` (its source path and "Timed out waiting" or
    "Connection closed by peer" in the text); NCCL and the store raise
    ``torch.distributed.DistError`` subclasses. The cause chain is followed because
    autograd may re-raise DDP's failed all-reduce from ``backward``.
    """
    dist_error = getattr(dist, "DistError", ())
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if dist_error and isinstance(exc, dist_error):
            return True
        if isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _COLLECTIVE_MARKERS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def first_line(exc: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True)
class PeerState:
    kind: str  # beat | ended | failed | unknown
    step: int = 0
    time: float = 0.0
    message: str = ""

    @classmethod
    def parse(cls, raw: Optional[bytes]) -> "PeerState":
        if raw is None:
            return cls("unknown")
        text = raw.decode("utf-8", "replace")
        kind, _, rest = text.partition(" ")
        try:
            if kind in ("beat", "ended"):
                step, moment = rest.split()
                return cls(kind, int(step), float(moment))
            if kind == "failed":
                moment, _, message = rest.partition(" ")
                return cls(kind, time=float(moment), message=message)
        except ValueError:
            pass
        return cls("unknown")


def _rank_list(ranks) -> str:
    ranks = sorted(ranks)
    shown = ", ".join(str(r) for r in ranks[:8]) + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")
    return f"rank{'s' if len(ranks) > 1 else ''} {shown}"


class PeerSupervisor:
    """One rank's heartbeat and, when a collective fails, the line naming the peer at fault.

    ``store`` is a c10d store every rank reaches (None: one process, nothing to do).
    ``on_arm`` runs once, at the first heartbeat: the runtime uses it to shorten the
    process group's timeout from the start-up value to the collective timeout.
    """

    def __init__(self, store, rank: int, world_size: int, timeout_minutes: float, *, prefix: str = "partialfc",
                 on_arm: Optional[Callable[[], None]] = None, watch: bool = False,
                 grace_seconds: float = GRACE_SECONDS, exit_process: Callable[[int], None] = os._exit) -> None:
        if timeout_minutes <= 0:
            raise ValueError(f"collective timeout must be > 0 minutes, got {timeout_minutes!r}")
        self.store = store if world_size > 1 else None
        self.rank, self.world_size = rank, world_size
        self.timeout_minutes = float(timeout_minutes)
        self.prefix = prefix.rstrip("/")
        self.step = 0
        self._on_arm, self._watch, self._armed = on_arm, watch, False
        self._grace = grace_seconds
        self._exit = exit_process
        self._written = float("-inf")
        self._progress = time.monotonic()
        self._waiting_for_data = False
        self._alone = False
        self._stop = threading.Event()
        self._report_lock, self._reported = threading.Lock(), False
        self._thread: Optional[threading.Thread] = None
        self._write("beat", f"0 {time.time():.3f}")  # a state from the start: a peer reading it never waits

    @property
    def active(self) -> bool:
        return self.store is not None

    # ------------------------------------------------------------------ writing
    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def _write(self, kind: str, rest: str) -> None:
        if self.store is not None:
            self.store.set(self._key(f"state/{self.rank}"), f"{kind} {rest}")

    def batch_arrived(self) -> None:
        """Call when the loader hands over a batch: from here on the rank computes and communicates."""
        self._waiting_for_data = False
        self._progress = time.monotonic()

    def beat(self, step: int) -> None:
        """Call after every step, right before asking the loader for the next batch.

        Cheap: a store write at most every HEARTBEAT_SECONDS.
        """
        self.step = step
        self._waiting_for_data = True
        self._progress = time.monotonic()
        if self.store is None:
            return
        if not self._armed:
            self._armed = True
            if self._on_arm is not None:
                self._on_arm()
            if self._watch:
                self._thread = threading.Thread(target=self._watch_loop, name="partialfc-peer-watch", daemon=True)
                self._thread.start()
        now = time.time()
        if now - self._written >= HEARTBEAT_SECONDS:
            self._write("beat", f"{step} {now:.3f}")
            self._written = now

    @contextlib.contextmanager
    def working_alone(self):
        """Work the peers wait for (rank 0's evaluation) is not a stall of this rank.

        The peers' wait is still bounded by the collective timeout; this only keeps the
        watch thread of the working rank from blaming them meanwhile.
        """
        self._alone = True
        try:
            yield
        finally:
            self._alone = False
            self._progress = time.monotonic()

    def _claim_report(self) -> bool:
        """One line per rank: the first of main thread and watch thread to fail reports."""
        with self._report_lock:
            first, self._reported = not self._reported, True
        return first

    def publish_failure(self, message: str) -> None:
        """Tell the peers this rank stops on its own error (before the process exits)."""
        self._claim_report()
        self._write_failure(message)

    def _write_failure(self, message: str) -> None:
        if self.store is None:
            return
        try:
            self._write("failed", f"{time.time():.3f} {message}")
            self.store.add(self._key("failed_count"), 1)
        except RuntimeError:
            pass  # the store is gone too; the peers' collectives still fail

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None

    # ------------------------------------------------------------------ diagnosis
    def _read_states(self) -> dict[int, PeerState]:
        keys = [self._key(f"state/{r}") for r in range(self.world_size)]
        if self.store.check(keys):  # all present: one round trip (multi_get would wait for a missing key)
            raw = self.store.multi_get(keys)
        else:
            raw = [self.store.get(key) if self.store.check([key]) else None for key in keys]
        return {rank: PeerState.parse(value) for rank, value in enumerate(raw)}

    def _timeout_text(self) -> str:
        return f"collective timeout {self.timeout_minutes:g} min"

    def explain_collective_failure(self, exc: BaseException) -> str:
        """The line for a collective that raised on this rank (gloo; NCCL in blocking mode)."""
        if not self._claim_report():  # the watch thread is reporting and ends the process
            time.sleep(self._grace + 3 * STORE_TIMEOUT_SECONDS)
        text = str(exc)
        if "Timed out" in text or "timeout" in text.lower():
            cause = self._timeout_text()
        elif "closed" in text or "reset" in text:
            cause = "its connection closed"
        else:
            cause = first_line(exc)
        return self._diagnose(f"a collective failed after step {self.step} ({first_line(exc)})", cause)

    def _diagnose(self, what: str, cause: str) -> str:
        """Mark this rank ended, give the other survivors the grace period, name the culprit."""
        if self.store is None:
            return what
        try:
            self.store.set_timeout(datetime.timedelta(seconds=STORE_TIMEOUT_SECONDS))
            self._write("ended", f"{self.step} {time.time():.3f}")
            deadline = time.monotonic() + self._grace
            while True:
                others = {r: s for r, s in self._read_states().items() if r != self.rank}
                failed = sorted(r for r, s in others.items() if s.kind == "failed")
                silent = sorted(r for r, s in others.items() if s.kind in ("beat", "unknown"))
                if failed or not silent or time.monotonic() >= deadline:
                    break
                time.sleep(0.2)
        except RuntimeError as error:  # DistStoreError: the store's host is gone or stopped
            return f"{what}; the rendezvous store cannot be read to tell which rank stopped ({first_line(error)})"
        if failed:
            # Its own message, again: on a multi-node job that rank's line is in another node's log.
            first = others[failed[0]].message.removeprefix(f"error [rank {failed[0]}]: ")
            told = f": {first if len(first) <= 300 else first[:297] + '...'}" if first else " (see its error)"
            if len(failed) > 1:
                told = f"; rank {failed[0]}{told}"
            return f"stopped because {_rank_list(failed)} failed{told}"
        if silent:
            now = time.time()
            if len(silent) == 1:
                details = self._describe_silent(others[silent[0]], now)
            else:
                details = "; ".join(f"rank {r} {self._describe_silent(others[r], now)}" for r in silent[:4])
            return f"{_rank_list(silent)} stopped answering: {details} ({cause})"
        return f"{what} on every rank; none stopped, so the connection between them failed ({cause})"

    @staticmethod
    def _describe_silent(state: PeerState, now: float) -> str:
        if state.kind == "unknown":
            return "no heartbeat recorded"
        ago = max(0.0, now - state.time)
        if state.step == 0:
            return f"no step finished yet (started {ago:.0f} s ago)"
        return f"last heartbeat at step {state.step}, {ago:.0f} s ago"

    # ------------------------------------------------------------------ NCCL watch
    def _watch_loop(self) -> None:
        """End the process with the one line when this rank stops progressing or a peer failed.

        Needed where a collective never returns to Python (NCCL): the main thread then
        waits on the GPU and cannot raise. A rank stuck waiting for its own data
        loader is the culprit and says so (and publishes it, so its peers name it); a
        rank stuck with a batch in hand is waiting in a collective and diagnoses.
        """
        limit = self.timeout_minutes * 60.0
        while not self._stop.wait(1.0):
            try:
                peer_failed = self.store.add(self._key("failed_count"), 0) > 0
            except RuntimeError:
                peer_failed = False
            if not peer_failed and (self._alone or time.monotonic() - self._progress <= limit):
                continue
            if not self._claim_report():
                return
            if not peer_failed and self._waiting_for_data:
                line = (f"the data loader gave no batch for {self.timeout_minutes:g} min after step {self.step}; "
                        f"the other ranks wait for this one ({self._timeout_text()})")
                self._write_failure(line)
            else:
                line = self._diagnose(f"no step finished for {self.timeout_minutes:g} min after step {self.step}",
                                      self._timeout_text())
            print(f"error [rank {self.rank}]: {line}", file=sys.stderr, flush=True)
            self._exit(EXIT_CODE)
            return
