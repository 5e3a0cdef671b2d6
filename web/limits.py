"""What keeps a long-running public server bounded: its limits (flags, with defaults stated here), the work
directory where recordings and renders go (one per user, kept across runs; unguessable names, a size quota,
age-based clean-up), and the idle test that reaps tabs which vanished without an unload event.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import fcntl
import gc
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, TypeVar

from stream.recorder import recording_paths

log = logging.getLogger("liveportrait.limits")
T = TypeVar("T")


@dataclass
class Limits:
    """Every per-server bound, with its default; `add_arguments` makes each a flag."""
    idle_timeout: float = 600.0  # s without any request or webcam frame from a tab before it is reaped
    record_max_s: float = 600.0  # a recording stops here (the page says so); the file is kept
    render_max_s: float = 300.0  # longest driving video the Video-file tab renders
    render_max_mb: float = 100.0  # largest driving video upload
    work_quota_mb: float = 2048.0  # recordings + renders on disk; the oldest go first, new ones wait when full
    work_max_age_h: float = 24.0  # recordings and renders are deleted after this

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Limits":
        return cls(**{k: getattr(args, k) for k in cls.__dataclass_fields__ if getattr(args, k, None) is not None})


HELP = {
    "idle_timeout": "seconds a tab may be silent (no request, no webcam frame) before its session is freed",
    "record_max_s": "maximum length of a recording in seconds; it stops there and the page says so",
    "render_max_s": "maximum length in seconds of a driving video in the Video-file tab",
    "render_max_mb": "maximum size in MB of a driving video upload",
    "work_quota_mb": "disk quota in MB for recordings and renders (the oldest are deleted first)",
    "work_max_age_h": "recordings and renders are deleted after this many hours",
}


def argument(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type from a parser that raises ValueError with a message meant for the user."""
    def run(text: str) -> T:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    run.__name__ = parse.__name__
    return run


def positive(kind: type[T]) -> Callable[[str], T]:
    """An argparse type: a number of `kind` above 0 (0 would spin a loop, disable a limit or reap at once)."""
    def parse(text: str) -> T:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} must be above 0")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for name, default in Limits.__dataclass_fields__.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=positive(float), default=default.default,
                            help=f"{HELP[name]} (default: {default.default:g})")


def default_work_dir() -> Path:
    """Where recordings and renders go unless --work-dir says otherwise: the same directory for every run, so the
    quota and the age limit also cover what earlier runs left."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "liveportrait-live" / "work"


def claim(path: Path) -> IO:
    """Make `path` this server's work directory: created if need be, and locked while the returned file stays open
    (the process's lifetime), so that a second server cannot clean up files the first is still handing out.
    Raises ValueError with the one line the user is told."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock = open(path / ".lock", "w")
    except OSError as e:  # mkdir(exist_ok=True) raises FileExistsError only for a file in the way
        raise ValueError(f"--work-dir {path}: "
                         f"{'not a directory' if isinstance(e, FileExistsError) else e.strerror.lower()}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ValueError(f"--work-dir {path} is in use by another running server; give each its own") from None
    return lock


class WorkDir:
    """Recordings and renders on disk. Names carry 128 random bits, so a file's URL cannot be guessed; only the
    tab that made a file is given its name. The clean-up (at start, on `reserve`, and every 30 s from the worker's
    reaper) never deletes a file being written or one in `pending()`: finished, not yet handed to the page.
    `reserve` says no when those fill the quota."""

    def __init__(self, path: Path, limits: Limits, pending: Callable[[], set[Path]] = set):
        self.path, self.limits, self.pending = path, limits, pending
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._rendering: set[Path] = set()  # renders being written (recordings: stream.recorder knows them)
        self.clean()  # what earlier runs left past the limits

    def reserve(self, kind: str) -> Path | None:
        """A fresh path for a `kind` ("recording", "render") file, or None when the disk quota is used up."""
        with self._lock:
            self._clean()
            if self.usage() >= self.limits.work_quota_mb * 2**20:
                return None
            return self.path / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(16)}.mp4"

    @contextlib.contextmanager
    def writing(self, path: Path):
        """While a render writes `path`, the clean-up leaves it alone."""
        with self._lock:
            self._rendering.add(path)
        try:
            yield path
        finally:
            with self._lock:
                self._rendering.discard(path)

    def usage(self) -> int:
        total = 0
        for f in self._files():
            try:
                total += f.stat().st_size
            except FileNotFoundError:  # a failed render deletes its file meanwhile
                continue
        return total

    def clean(self) -> None:
        with self._lock:
            self._clean()

    def _files(self) -> list[Path]:
        files = []
        for f in self.path.glob("*.mp4"):
            try:
                files.append((f.stat().st_mtime, f))
            except FileNotFoundError:  # deleted meanwhile
                continue
        return [f for _, f in sorted(files)]

    def _clean(self) -> None:
        """Delete files past the age limit, then the oldest while over the quota (files being written or not yet
        handed to the page stay)."""
        oldest = time.time() - self.limits.work_max_age_h * 3600
        busy = self._rendering | recording_paths() | self.pending()
        files = [f for f in self._files() if f not in busy]
        total = self.usage()
        for f in files:
            try:
                size, mtime = f.stat().st_size, f.stat().st_mtime
                if mtime < oldest or total > self.limits.work_quota_mb * 2**20:
                    f.unlink()
                    total -= size
                    log.info("deleted %s (%s)", f.name, "age" if mtime < oldest else "quota")
            except FileNotFoundError:
                continue


def release_memory() -> None:
    """Give the heap's free pages back to the OS. A connection's codecs, face tracker and threads allocate from
    glibc's per-thread arenas, which keep freed memory: measured, server RSS grew 170 MB per round of three
    tabs with nothing left alive (docs/reliability.md). No-op without glibc."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _LIBC.malloc_trim  # glibc only
except (OSError, AttributeError):
    _LIBC = None
