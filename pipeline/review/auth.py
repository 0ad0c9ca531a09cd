"""Authentication state of the review app: server-side sessions, login throttling with
lockout, and a bound on concurrent password checks.

All three live in the app's memory (one process): sessions end when the app restarts, and a
restart also forgets failed logins. The clock is passed in (``now``, seconds since the epoch),
so the caller owns time and tests can move it.
"""

from __future__ import annotations

import secrets
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, TypeVar

__all__ = ["Busy", "HashGate", "LoginThrottle", "Lookup", "Session", "SessionStore"]

T = TypeVar("T")

#: Why a session id found no live session.
EndReason = Literal["", "unknown", "idle", "expired"]


@dataclass
class Session:
    """One login: the user, its CSRF token, when it began and when it was last used."""

    sid: str
    user: str
    csrf: str
    created: float
    seen: float


class Lookup(NamedTuple):
    """What :meth:`SessionStore.get` found: the live session, else why none (``unknown``,
    ``idle``, ``expired``) and the user of a session that just ended."""

    session: Session | None
    reason: EndReason
    user: str | None


class SessionStore:
    """Logins held server-side, keyed by a random session id (the only thing the cookie holds).

    A session ends at logout (:meth:`delete`), ``idle_s`` seconds after its last use, or
    ``absolute_s`` seconds after it began, whichever comes first; a cookie captured before
    any of these opens nothing afterwards.

    Parameters
    ----------
    idle_s:
        Idle timeout in seconds.
    absolute_s:
        Absolute timeout in seconds.
    """

    def __init__(self, *, idle_s: float, absolute_s: float) -> None:
        if idle_s <= 0 or absolute_s <= 0:
            raise ValueError("session timeouts must be positive")
        self.idle_s = idle_s
        self.absolute_s = absolute_s
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}

    def _end_reason(self, s: Session, now: float) -> EndReason:
        if now - s.created > self.absolute_s:
            return "expired"
        if now - s.seen > self.idle_s:
            return "idle"
        return ""

    def create(self, user: str, now: float) -> Session:
        """A new session of ``user`` (a fresh id and CSRF token); ended sessions are dropped."""
        s = Session(
            sid=secrets.token_urlsafe(32),
            user=user,
            csrf=secrets.token_urlsafe(32),
            created=now,
            seen=now,
        )
        with self._lock:
            for sid in [k for k, v in self._sessions.items() if self._end_reason(v, now)]:
                del self._sessions[sid]
            self._sessions[s.sid] = s
        return s

    def get(self, sid: object, now: float) -> Lookup:
        """The live session of ``sid`` (its last use set to ``now``), or why there is none
        (and whose session just ended)."""
        if not isinstance(sid, str) or not sid:
            return Lookup(None, "unknown", None)
        with self._lock:
            s = self._sessions.get(sid)
            if s is None:
                return Lookup(None, "unknown", None)
            reason = self._end_reason(s, now)
            if reason:
                del self._sessions[sid]
                return Lookup(None, reason, s.user)
            s.seen = now
            return Lookup(s, "", s.user)

    def delete(self, sid: object) -> bool:
        """End a session; True when there was one."""
        if not isinstance(sid, str):
            return False
        with self._lock:
            return self._sessions.pop(sid, None) is not None

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)


@dataclass
class _Failures:
    times: deque[float] = field(default_factory=deque)
    locked_until: float = 0.0


class LoginThrottle:
    """Failed logins counted per user name and per client address, with lockout.

    ``user_failures`` failures of one user name (known or not, so a lockout tells nothing about
    which names exist), or ``address_failures`` from one address, within ``window_s`` seconds
    lock that name or address for ``lockout_s`` seconds. While locked, a login is refused
    before its password is checked, so a right password and a wrong one get the same answer.

    Parameters
    ----------
    user_failures, address_failures:
        Failures that lock a user name, an address.
    window_s:
        The window failures are counted in, in seconds.
    lockout_s:
        How long a lock lasts, in seconds.
    max_entries:
        Names and addresses remembered at most; the stalest are forgotten first.
    """

    def __init__(
        self,
        *,
        user_failures: int,
        address_failures: int,
        window_s: float,
        lockout_s: float,
        max_entries: int = 100_000,
    ) -> None:
        if min(user_failures, address_failures) < 1 or window_s <= 0 or lockout_s <= 0:
            raise ValueError("throttle limits must be positive")
        self.limits = {"user": user_failures, "address": address_failures}
        self.window_s = window_s
        self.lockout_s = lockout_s
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], _Failures] = {}

    @staticmethod
    def _keys(user: str, address: str) -> list[tuple[str, str]]:
        return [("user", user.casefold()[:256]), ("address", address)]

    def locked(self, user: str, address: str, now: float) -> float:
        """Seconds until ``user`` and ``address`` may try again (0.0: not locked)."""
        with self._lock:
            left = 0.0
            for key in self._keys(user, address):
                entry = self._entries.get(key)
                if entry is not None and entry.locked_until > now:
                    left = max(left, entry.locked_until - now)
            return left

    def failed(self, user: str, address: str, now: float) -> float:
        """Count one failure; return the seconds of a lock it started (0.0: none)."""
        with self._lock:
            started = 0.0
            for key in self._keys(user, address):
                entry = self._entries.setdefault(key, _Failures())
                while entry.times and entry.times[0] <= now - self.window_s:
                    entry.times.popleft()
                entry.times.append(now)
                if len(entry.times) >= self.limits[key[0]] and entry.locked_until <= now:
                    entry.locked_until = now + self.lockout_s
                    entry.times.clear()
                    started = self.lockout_s
            self._prune(now)
            return started

    def succeeded(self, user: str) -> None:
        """A right password (while not locked) clears the user name's failures; the address
        keeps its count, so one valid account does not reset an address's guesses."""
        with self._lock:
            self._entries.pop(("user", user.casefold()[:256]), None)

    def _prune(self, now: float) -> None:
        if len(self._entries) <= self.max_entries:
            return
        for key in [
            k
            for k, e in self._entries.items()
            if e.locked_until <= now and (not e.times or e.times[-1] <= now - self.window_s)
        ]:
            del self._entries[key]
        if len(self._entries) > self.max_entries:
            stalest = sorted(
                self._entries,
                key=lambda k: max(self._entries[k].locked_until, *self._entries[k].times, 0.0),
            )
            for key in stalest[: len(self._entries) - self.max_entries]:
                del self._entries[key]


class Busy(Exception):
    """Too many password checks running and waiting: the caller should answer 503."""


class HashGate:
    """Runs password checks in worker threads, at most ``concurrency`` at once and at most
    ``queue`` waiting; a check beyond that is refused at once (:class:`Busy`), never queued.

    Memory and CPU spent on hashing are so bounded (argon2 takes 64 MiB per check), and the
    event loop and the threads that serve pages never wait behind a hash.

    Parameters
    ----------
    concurrency:
        Checks that run at once.
    queue:
        Checks that may wait for a free slot.
    """

    def __init__(self, concurrency: int, queue: int) -> None:
        if concurrency < 1 or queue < 0:
            raise ValueError("need concurrency >= 1 and queue >= 0")
        self.concurrency = concurrency
        self.queue = queue
        self._pending = 0
        self._limiter: Any = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread of the gate's own limiter.

        Raises
        ------
        Busy
            When ``concurrency + queue`` checks are already running or waiting.
        """
        import anyio
        import anyio.to_thread

        if self._pending >= self.concurrency + self.queue:
            raise Busy("too many logins at once")
        if self._limiter is None:  # made inside the event loop, on first use
            self._limiter = anyio.CapacityLimiter(self.concurrency)
        self._pending += 1
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        finally:
            self._pending -= 1
