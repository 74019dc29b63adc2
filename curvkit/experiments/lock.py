"""A lock on a results directory: one ``train`` / ``ablate`` process writes it at a time.

Two processes appending to one ``results.jsonl`` would both run every pending run and
merge duplicate records, so the writer takes ``DIR/.curvkit.lock`` first:

* The lock file is created atomically (``open(O_CREAT | O_EXCL)``) and holds the holder as
  JSON: ``pid``, ``host``, ``command`` and ``since`` (UTC). A second process finds it and
  refuses with :class:`LockedError`, naming the holder.
* A lock whose holder is gone (same host and the pid is not alive, or a lock file left
  empty by a process killed between creating and writing it, older than
  :data:`EMPTY_GRACE` seconds) is *stale*: it is taken over with a :class:`StaleLockWarning`.
  A holder on another host cannot be checked from here; the message says which file to
  remove once that process is known to be gone.
* The takeover itself is guarded by a second ``O_EXCL`` file, so of two processes that
  find the same stale lock only one takes it.

The lock is released (the file removed) when the ``with`` block ends, also on an
exception or KeyboardInterrupt; after SIGKILL it stays and is stale for the next process.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from curvkit.errors import CurvkitError

LOCK_FILE = ".curvkit.lock"
EMPTY_GRACE = 10.0   # seconds an empty lock file may be "being written" by its creator
GUARD_STALE = 60.0   # seconds after which a leftover takeover guard is removed


class LockedError(CurvkitError):
    """The results directory is locked by another live process."""


class StaleLockWarning(UserWarning):
    """A lock left by a process that no longer exists was taken over."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _holder_text(info: dict[str, Any]) -> str:
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since "
            f"{info.get('since', '?')} (command: {info.get('command', '?')})")


class DirectoryLock:
    """``with DirectoryLock(out): ...`` holds ``out/.curvkit.lock`` for the block."""

    def __init__(self, directory: str | os.PathLike, command: str | None = None) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.command = command if command is not None else " ".join(sys.argv)
        self.held = False

    # ------------------------------------------------------------------ holder
    def _info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "since": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, (json.dumps(self._info()) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _read(self) -> dict[str, Any] | None:
        """The holder, ``{}`` for an empty or unreadable lock file, None if there is none."""
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            info = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return info if isinstance(info, dict) else {}

    def _stale(self, info: dict[str, Any]) -> str:
        """Why the lock is stale, or "" if its holder may be alive."""
        if not info:
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return "gone"
            return f"empty lock file, {age:.0f}s old" if age > EMPTY_GRACE else ""
        pid, host = info.get("pid"), info.get("host")
        if host == socket.gethostname() and isinstance(pid, int) and not isinstance(pid, bool):
            if pid == os.getpid():
                return ""
            return "" if _pid_alive(pid) else f"process {pid} on {host} is not alive"
        return ""

    # ------------------------------------------------------------------ acquire / release
    def acquire(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                self.held = True
                return
            info = self._read()
            if info is None:
                continue  # released meanwhile: try again
            why = self._stale(info)
            if not why:
                if info and info.get("pid") == os.getpid() and \
                        info.get("host") == socket.gethostname():
                    raise LockedError(f"{self.directory}: already locked by this process")
                remote = info and info.get("host") != socket.gethostname()
                hint = (f"; if that process is gone, remove {self.path}" if remote else
                        "; wait for it to finish (or stop it), then re-run to resume")
                holder = _holder_text(info) if info else "a process that is creating it"
                raise LockedError(f"{self.directory}: in use by {holder}{hint}")
            if self._take_over(info, why):
                self.held = True
                return
        raise LockedError(f"{self.directory}: could not take the lock {self.path} "
                          f"(other processes keep taking it)")

    def _take_over(self, info: dict[str, Any], why: str) -> bool:
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                if time.time() - guard.stat().st_mtime > GUARD_STALE:
                    guard.unlink()
            except FileNotFoundError:
                pass
            time.sleep(0.05)
            return False
        os.close(fd)
        try:
            if self._read() != info:  # someone else took it over meanwhile
                return False
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            if not self._create():
                return False
        finally:
            try:
                guard.unlink()
            except FileNotFoundError:
                pass
        holder = _holder_text(info) if info else "an unknown process"
        warnings.warn(f"{self.directory}: took over the lock left by {holder} ({why}); "
                      f"its unfinished runs resume", StaleLockWarning, stacklevel=3)
        return True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        info = self._read()
        if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
