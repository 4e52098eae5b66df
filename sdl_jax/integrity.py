"""Digest manifests: the SHA-256 of every file of a directory, written once it is complete
and checked before it is read.

A manifest is a file ``SHA256SUMS`` at the top of the directory in ``sha256sum``'s format
(``<64 hex digits>  <path relative to the directory>`` per line, sorted by path), so that
``cd <dir> && sha256sum -c SHA256SUMS`` checks it by hand too. It is written atomically (a
temporary file renamed over it): a reader sees no manifest or a whole one.

``verify`` tells three cases apart: the files match (``True``), there is no manifest
(``False``: a directory written before manifests existed, or whose writer died between
finishing it and writing the manifest), or a listed file is missing or differs
(``IntegrityError`` naming the first such file and how it differs).
"""

from __future__ import annotations

import hashlib
import os

MANIFEST = "SHA256SUMS"

_CHUNK = 1 << 20


class IntegrityError(ValueError):
  """A directory's files do not match its manifest."""


def sha256_file(path: str) -> str:
  """The SHA-256 of the file at ``path``, as 64 lower-case hex digits."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(_CHUNK), b""):
      h.update(block)
  return h.hexdigest()


def _files(directory: str) -> list[str]:
  """Every regular file under ``directory`` (relative, '/'-separated, sorted), except
  the manifest and its temporary file."""
  out = []
  for root, _, names in os.walk(directory):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
      if rel not in (MANIFEST, MANIFEST + ".tmp"):
        out.append(rel)
  return sorted(out)


def write_manifest(directory: str) -> str:
  """Writes ``directory/SHA256SUMS`` for the files now in ``directory``; returns its path.

  Call it only once the directory is complete: whatever is there is what ``verify`` will
  expect. The manifest is written to a temporary file, flushed to disk and renamed.
  """
  lines = "".join(f"{sha256_file(os.path.join(directory, rel))}  {rel}\n"
                  for rel in _files(directory))
  path = os.path.join(directory, MANIFEST)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(lines)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return path


def read_manifest(directory: str) -> dict[str, str] | None:
  """``{relative path: sha256}`` of ``directory``'s manifest, or ``None`` if it has none.

  Raises:
    IntegrityError: a line of the manifest is not ``<64 hex digits>  <path>``.
  """
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    return None
  out = {}
  with open(path, encoding="utf-8", errors="replace") as f:
    for lineno, line in enumerate(f, 1):
      digest, sep, rel = line.rstrip("\n").partition("  ")
      if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise IntegrityError(f"{path}:{lineno}: not a '<sha256>  <file>' line: {line!r}")
      out[rel] = digest
  return out


def verify(directory: str) -> bool:
  """Checks every file listed in ``directory``'s manifest.

  Returns:
    ``True`` if all listed files exist with their digests, ``False`` if there is no
    manifest (nothing could be checked). Files not listed are not looked at.

  Raises:
    IntegrityError: naming the first listed file that is missing or differs (with its
      size, which tells a truncated file from a changed one).
  """
  listed = read_manifest(directory)
  if listed is None:
    return False
  for rel, digest in sorted(listed.items()):
    path = os.path.join(directory, rel)
    if not os.path.isfile(path):
      raise IntegrityError(f"{path} is missing (listed in {MANIFEST})")
    got = sha256_file(path)
    if got != digest:
      raise IntegrityError(
          f"{path} ({os.path.getsize(path)} bytes) does not match its SHA-256 in "
          f"{MANIFEST}: truncated or altered after it was written")
  return True
