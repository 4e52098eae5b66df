"""The PyTorch side of the train-step benchmark in a process of its own.

``benchmarks.run`` interleaves JAX's and PyTorch's repeats; run in one process the two
slowed each other: on a 2-core AVX2 machine EfficientNet-Lite0's JAX step
measured 9.10 img/s with ``--torch=none`` and 7.03 beside PyTorch, and PyTorch's 9.34
alone and 7.89 with a JAX step between its steps (exploratory script; README,
"Performance"). Each framework's users run it in a process of its own, so by default
(``--torch_process=separate``) the PyTorch trainer lives in a child process started with
``spawn`` (no JAX state inherited) and the benchmark drives it over a pipe: ``step()``
sends one step, ``sync()`` waits until every step sent has finished. The repeats stay
interleaved: while one side runs the other waits idle.

The child gets the parent's environment but ``OMP_WAIT_POLICY`` as it was before this
module was imported (the library sets it for its own oneDNN threads; it is not PyTorch's
default), ``$SDL_JAX_MALLOC`` set to ``malloc``, which the child's
``sdl_jax.cpu.configure`` applies (``default``: glibc's allocator as PyTorch runs by
default; ``keep``: the library's ``config.cpu.malloc='keep'``), and
``torch.set_num_threads(threads)``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import traceback

# OMP_WAIT_POLICY before the library set it (on loading oneDNN): the child's.
_START_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")


def child_env(malloc: str = "default") -> dict:
  env = dict(os.environ)
  env.pop("OMP_WAIT_POLICY", None)
  if _START_WAIT_POLICY is not None:
    env["OMP_WAIT_POLICY"] = _START_WAIT_POLICY
  env["SDL_JAX_MALLOC"] = malloc
  return env


@contextlib.contextmanager
def _environment(env: dict):
  """``os.environ`` is ``env`` inside the block (only the variables that differ are set or
  removed), and as it was after it."""
  changed = {k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k)}
  saved = {k: os.environ.get(k) for k in changed}
  for k in changed:
    _set(k, env.get(k))
  try:
    yield
  finally:
    for k, v in saved.items():
      _set(k, v)


def _set(key: str, value: str | None):
  if value is None:
    os.environ.pop(key, None)
  else:
    os.environ[key] = value


def _serve(conn, threads, args, kwargs):
  """The child: builds the trainer, then answers ``step``, ``sync``, ``first_step``,
  ``peak_bytes`` and ``close`` until told to close. Its environment was set before it
  started (``TorchProcess``)."""
  try:
    from sdl_jax import cpu, perf  # pylint: disable=g-import-not-at-top
    cpu.configure()  # the allocator as $SDL_JAX_MALLOC says, before torch starts threads
    import torch  # pylint: disable=g-import-not-at-top
    from benchmarks import torch_train  # pylint: disable=g-import-not-at-top
    from sdl_jax.cpu import process  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(threads)
    trainer = torch_train.TorchTrainer(*args, **kwargs)
    conn.send(("ok", {"params": trainer.num_params(), "threads": torch.get_num_threads(),
                      "freed_memory_kept": process.freed_memory_kept()}))
  except Exception:  # pylint: disable=broad-except
    conn.send(("error", traceback.format_exc()))
    return
  while True:
    cmd = conn.recv()
    try:
      if cmd == "step":
        trainer.step()
        continue
      if cmd == "sync":
        trainer.sync()
        reply = None
      elif cmd == "first_step":
        seconds, growth = perf.timed_step(trainer.step, trainer.sync)
        reply = {"seconds": seconds, "rss_growth": growth}
      elif cmd == "peak_bytes":
        reply = (torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None)
      elif cmd == "close":
        conn.send(("ok", None))
        return
      else:
        raise ValueError(f"unknown command {cmd!r}")
      conn.send(("ok", reply))
    except Exception:  # pylint: disable=broad-except
      conn.send(("error", traceback.format_exc()))
      return


class TorchProcess:
  """``torch_train.TorchTrainer(*args, **kwargs)`` in a child process, with its
  ``step``/``sync``/``num_params``; ``first_step()`` times one step there (seconds and
  the child's peak RSS growth). ``malloc``: the child's ``$SDL_JAX_MALLOC`` (``default``
  or ``keep``). Raises RuntimeError with the child's traceback if it fails."""

  def __init__(self, *args, threads: int, malloc: str = "default", **kwargs):
    from sdl_jax.cpu import process  # pylint: disable=g-import-not-at-top
    malloc = process.check_malloc(malloc, "malloc")
    ctx = multiprocessing.get_context("spawn")
    self._conn, child = ctx.Pipe()
    env = child_env(malloc)
    self._proc = ctx.Process(target=_serve, daemon=True,
                             args=(child, threads, args, kwargs))
    # The environment must be the child's already when it starts: spawn imports this
    # program's main module before ``_serve`` runs.
    with _environment(env):
      self._proc.start()
    child.close()
    self.info = self._reply()
    self._pending = 0

  def _reply(self):
    try:
      status, value = self._conn.recv()
    except EOFError as e:
      raise RuntimeError(f"the PyTorch benchmark process exited (code "
                         f"{self._proc.exitcode})") from e
    if status != "ok":
      raise RuntimeError(f"the PyTorch benchmark process failed:\n{value}")
    return value

  def num_params(self) -> int:
    return self.info["params"]

  def step(self):
    self._conn.send("step")

  def sync(self):
    self._conn.send("sync")
    self._reply()

  def first_step(self) -> dict:
    self._conn.send("first_step")
    return self._reply()

  def peak_bytes(self):
    self._conn.send("peak_bytes")
    return self._reply()

  def close(self):
    if self._proc.is_alive():
      try:
        self._conn.send("close")
        self._reply()
      except (OSError, RuntimeError):
        pass
      self._proc.join(timeout=30)
      if self._proc.is_alive():
        self._proc.kill()
    self._conn.close()

