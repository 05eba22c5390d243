"""Advisory locks that keep a second process out of a run directory or a results store.

A lock is a file (``<dir>/.lock`` for a run directory) that its holder keeps open with an exclusive
``flock`` (``io.try_flock``) and fills with who it is: host, pid, command line, start time and a
random token, as JSON. Because the kernel drops an ``flock`` with the last open file, a holder that
dies (kill -9, an out-of-memory kill, a crash) releases the lock by itself; the next process takes it
over and says whose lock it found (a stale one when that pid no longer exists on this host). A
process that finds the lock held gets :class:`LockHeld`, a one-line user error naming the holder.

Processes started by a holder to do its work under its lock (the bench's job commands, the workers
of torchrun) get the holder's token in ``MAE_TRANSFER_LOCKS`` (:meth:`FileLock.child_env`); to them the
lock is theirs. A process taking a lock it already holds is let through too.

Where the file system has no ``flock`` (some network file systems), the JSON alone decides: a lock
whose pid lives on this host, or whose holder is on another host, is held.

"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import shlex
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mae_transfer.config import ConfigError
from mae_transfer.io import link_refused, try_flock

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"  # in a run directory
ENV = "MAE_TRANSFER_LOCKS"  # tokens of the locks that the processes which started this one hold for it
_HELD: set[str] = set()  # tokens of the locks this process holds


class LockHeld(ConfigError):
    """Another process holds the lock (one line: what is locked, by whom, and what to do)."""

    def __init__(self, message: str, path: Path, holder: "Holder | None"):
        super().__init__(message)
        self.path = path
        self.holder = holder


def _command_line() -> str:
    argv = list(sys.argv) or ["python"]
    if argv[0].endswith("__main__.py"):  # python -m PACKAGE
        argv[0] = f"python -m {Path(argv[0]).parent.name}"
    else:
        argv[0] = Path(argv[0]).name
    text = " ".join([argv[0], shlex.join(argv[1:])]).strip()
    return text if len(text) <= 300 else text[:297] + "..."


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a lock."""

    host: str
    pid: int
    command: str
    since: str
    token: str = ""

    @classmethod
    def this_process(cls) -> "Holder":
        return cls(
            socket.gethostname(),
            os.getpid(),
            _command_line(),
            _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            uuid.uuid4().hex,
        )

    @classmethod
    def parse(cls, text: str) -> "Holder | None":
        try:
            d = json.loads(text)
            return cls(
                str(d["host"]),
                int(d["pid"]),
                str(d.get("command", "?")),
                str(d.get("since", "?")),
                str(d.get("token", "")),
            )
        except (ValueError, TypeError, KeyError):
            return None

    @property
    def here(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool | None:
        """Whether the holder's process exists (None: it runs on another host, which cannot be asked)."""
        if not self.here:
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process
            return True
        return True

    @property
    def short(self) -> str:
        """``host, pid N``."""
        return f"{self.host}, pid {self.pid}"

    def describe(self) -> str:
        """``host H, pid P, since T: COMMAND``."""
        return f"host {self.host}, pid {self.pid}, since {self.since}: {self.command}"


def read_holder(path: str | os.PathLike, tries: int = 5) -> Holder | None:
    """The holder written in the lock file ``path`` (None: no file, empty, or not readable). A
    holder writes its details just after locking: an empty or partial file is read again a few
    times."""
    for i in range(tries):
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError:
            return None
        holder = Holder.parse(text)
        if holder is not None or i == tries - 1:
            return holder
        time.sleep(0.05)
    return None


def _inherited() -> set[str]:
    return _HELD | {t for t in os.environ.get(ENV, "").split(",") if t}


class FileLock:
    """An exclusive lock on ``path`` that says who holds it. ``what`` names the locked thing in
    messages (``"run directory runs/x"``), ``advice`` says what to do when it is held.

    ``acquire(wait=0)`` tries once (``wait`` > 0: tries again until that many seconds have passed)
    and raises :class:`LockHeld` while another process holds it; ``release()``, or the end of a
    ``with lock.acquire():`` block, removes the file. ``previous``: the holder found in the file when
    it was taken over (a process that ended without releasing), else None."""

    def __init__(self, path: str | os.PathLike, what: str | None = None, advice: str = "wait for it to finish"):
        self.path = Path(path)
        self.what = what or str(self.path)
        self.advice = advice
        self.holder: Holder | None = None  # this process, while it holds the lock
        self.borrowed: Holder | None = None  # the holder that started this process (we run under its lock)
        self.previous: Holder | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None or self.borrowed is not None

    def acquire(self, wait: float = 0.0, poll: float = 0.2) -> "FileLock":
        if self.held:
            return self
        deadline = time.monotonic() + max(0.0, wait)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:  # never through a link planted at the lock's name: taking the lock truncates the file
                fd = os.open(
                    self.path,
                    os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0),
                    0o644,
                )
            except OSError:
                if self.path.is_symlink():
                    raise link_refused(self.path) from None
                raise
            got = try_flock(fd)
            if got is True and not self._same_file(fd):  # its holder removed it between our open and lock
                os.close(fd)
                continue
            holder = read_holder(self.path) if got is not True else None
            if got is None and holder is not None and holder.token not in _inherited() and holder.alive() is not False:
                got = False  # no flock here: the file alone says it is held
            if got is False:
                os.close(fd)
                if holder is not None and holder.token in _inherited():
                    self.borrowed = holder
                    return self
                if time.monotonic() >= deadline:
                    raise LockHeld(self._held_message(holder), self.path, holder)
                time.sleep(max(0.01, min(poll, deadline - time.monotonic())))
                continue
            self._take(fd)
            return self

    def _same_file(self, fd: int) -> bool:
        try:
            a, b = os.fstat(fd), os.stat(self.path)
        except OSError:
            return False
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    def _take(self, fd: int) -> None:
        with contextlib.suppress(OSError):
            old = os.pread(fd, 1 << 16, 0).decode("utf-8", "replace")
            self.previous = Holder.parse(old) if old.strip() else None
        if self.previous is not None:
            state = {
                False: "stale: that process no longer exists",
                None: "its process ended or its host went down",
                True: "that process released it without removing the file",
            }[self.previous.alive()]
            log.warning("%s: took over the lock left by %s (%s)", self.what, self.previous.describe(), state)
        self.holder = Holder.this_process()
        data = json.dumps(asdict(self.holder)).encode() + b"\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        with contextlib.suppress(OSError):
            os.fsync(fd)
        self._fd = fd
        _HELD.add(self.holder.token)

    def _held_message(self, holder: Holder | None) -> str:
        who = holder.describe() if holder else "another process (its details are not readable)"
        text = f"{self.what} is in use by another process ({who}); {self.advice}"
        if holder is not None and not holder.here:
            text += f" (if that process is gone, delete {self.path})"
        return text

    def release(self) -> None:
        """Give the lock back (a borrowed one stays with its holder)."""
        self.borrowed = None
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self.holder is not None:
            _HELD.discard(self.holder.token)
        with contextlib.suppress(OSError):
            if self._same_file(fd):
                os.unlink(self.path)  # still locked: a process that waits on this file sees it is gone
        os.close(fd)  # releases the flock

    def child_env(self) -> dict[str, str]:
        """Environment entries that let a process started now work under this lock."""
        token = (self.holder or self.borrowed).token if self.held else ""
        tokens = [t for t in os.environ.get(ENV, "").split(",") if t] + ([token] if token else [])
        return {ENV: ",".join(dict.fromkeys(tokens))}

    def __enter__(self) -> "FileLock":  # ``with lock.acquire():`` (entering does not lock by itself)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def dir_lock(directory: str | os.PathLike, what: str | None = None, advice: str = "wait for it to finish") -> FileLock:
    """The (not yet acquired) lock of ``directory``: ``<directory>/.lock``."""
    directory = Path(directory)
    return FileLock(directory / LOCK_FILE, what or f"{directory}", advice)


def hold_run_dir(output: str | os.PathLike, dist_info: Any = None) -> FileLock:
    """Take the run directory ``output`` for a run: the main process locks it (do this before
    anything is written there) and the caller releases it at the end (``with hold_run_dir(...):``).
    Under torch.distributed (``dist_info`` of ``init_distributed``) every process learns whether the
    main one got it, so that all raise :class:`LockHeld` together and none waits in a collective for
    a main process that has left; the other processes get a lock they do not hold. Without
    ``dist_info`` the rank is read from ``RANK`` (set by torchrun): only rank 0 locks."""
    main = dist_info.is_main if dist_info is not None else int(os.environ.get("RANK") or 0) == 0
    lock = dir_lock(output, f"the run directory {output}", "wait for it to finish, or use another --output")
    error: str | None = None
    if main:
        try:
            lock.acquire()
        except LockHeld as e:
            error = str(e)
    if dist_info is not None and dist_info.distributed:
        from mae_transfer.engine.distributed import broadcast_from_main

        error = broadcast_from_main(error)
    if error is not None:
        raise LockHeld(error, lock.path, None)
    return lock


__all__ = ["LOCK_FILE", "ENV", "FileLock", "Holder", "LockHeld", "dir_lock", "read_holder", "hold_run_dir"]
