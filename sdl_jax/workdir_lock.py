"""One writer per work directory: an exclusive ``flock`` on ``<workdir>/workdir.lock``.

Training holds the lock for its whole run, ``--mode=evaluate`` while it restores and
writes its results; a second one on the same workdir refuses at once with
``WorkdirLockedError``, naming the process that holds it (from the lock file's text).
Prediction only reads and takes no lock.

The lock is the kernel's ``flock`` on the open file, not the file's existence: it goes
away with the process that held it, however that process ended (SIGKILL included), so a
lock file left behind never blocks anyone. The file's text is ``{"pid", "host",
"purpose", "since"}`` of the holder while it is held, and empty once released cleanly; a
lock acquired over a non-empty file was left by a process that died holding it, which
is logged (as a WARNING naming it) and taken over.

``flock`` is reliable on local file systems; on network file systems (NFS and the like)
whether it excludes processes on other machines depends on the file system.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket

from absl import logging

LOCK_FILE = "workdir.lock"


class WorkdirLockedError(RuntimeError):
  """Another live process holds the work directory's lock."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Someone else's process: alive.
  return True


def _describe(holder: dict) -> str:
  return (f"process {holder.get('pid', '?')} on {holder.get('host', '?')} "
          f"({holder.get('purpose', '?')}, since {holder.get('since', '?')})")


def _read(fd: int) -> dict | None:
  """The lock file's holder record, ``None`` if empty, ``{}`` if unreadable."""
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 4096).decode("utf-8", "replace").strip()
  if not text:
    return None
  try:
    holder = json.loads(text)
  except ValueError:
    return {}
  return holder if isinstance(holder, dict) else {}


class WorkdirLock:
  """Context manager: holds ``workdir``'s lock for ``purpose`` (e.g. ``'training'``).

  With ``active=False`` it does nothing (processes other than 0 of a multi-process run,
  which share process 0's workdir).
  """

  def __init__(self, workdir: str, purpose: str, active: bool = True):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.purpose = purpose
    self.active = active
    self._fd = None

  def acquire(self) -> None:
    """Takes the lock or raises ``WorkdirLockedError`` naming its holder."""
    if not self.active or self._fd is not None:
      return
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _read(fd) or {}
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      raise WorkdirLockedError(
          f"workdir {os.path.dirname(self.path)} is in use by {_describe(holder)}: "
          f"{self.path} is locked. Wait for it to finish or stop it (kill "
          f"{holder.get('pid', '<pid>')}), or use another --workdir") from None
    left = _read(fd)
    if left is not None:
      pid = left.get("pid")
      state = ("no longer running" if isinstance(pid, int) and
               left.get("host") == socket.gethostname() and not _pid_alive(pid)
               else "ended without releasing it")
      logging.warning("workdir lock %s was left by %s, %s; taking it over", self.path,
                      _describe(left), state)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
              "since": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    os.fsync(fd)
    self._fd = fd

  def release(self) -> None:
    """Empties the lock file (a clean release) and unlocks it."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      os.ftruncate(fd, 0)
    finally:
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> bool:
    self.release()
    return False
