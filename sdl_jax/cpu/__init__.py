"""Speed on XLA:CPU: hand-written layers, oneDNN convolutions, and the process settings.

Modules: ``paths`` (whether the models take the hand paths), ``conv`` (+ ``depthwise``,
``dense``), ``dnnl``, ``dnnl_route`` and ``dnnl_lib`` (+ ``csrc/dnnl_conv.cc``:
convolutions), ``norm`` (BatchNorm with a hand-written gradient), ``pool`` (max-pools),
``process`` (XLA flags, glibc's allocator). The models reach the layers through
``sdl_jax.models.layers`` only.

Importing this package (or ``sdl_jax``) changes nothing in the process. An entry point
calls ``configure(config)`` first, before anything starts JAX; it reads ``config.cpu``
(``configs/sdl.py`` documents the fields):

* ``kernels``: ``auto`` | ``cpu`` | ``xla``, see ``paths`` (``$SDL_JAX_KERNELS`` overrides);
* ``dnnl``: which convolutions go to oneDNN, see ``dnnl_route`` (``$SDL_JAX_DNNL`` overrides);
* ``fast_xla_flags``: append ``process.FAST_CPU_XLA_FLAGS`` to ``$XLA_FLAGS`` (a flag the
  user set keeps the user's value; one the installed jaxlib does not know is dropped with
  a warning);
* ``malloc``: ``default`` (glibc's allocator as it is) or ``keep``
  (``process.keep_freed_memory``: faster steps, more memory; ``$SDL_JAX_MALLOC``
  overrides).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

_log = logging.getLogger(__name__)
MALLOC_ENV = "SDL_JAX_MALLOC"
DEFAULTS = {"kernels": "auto", "dnnl": "auto", "fast_xla_flags": True, "malloc": "default"}
_applied: dict[str, Any] = {}


def settings(config=None) -> dict[str, Any]:
  """``DEFAULTS`` updated with ``config.cpu`` (``config`` an experiment config, or None;
  a config without a ``cpu`` field, e.g. one saved by an older version, gives the
  defaults). An unknown field is a ValueError naming it."""
  out = dict(DEFAULTS)
  cpu = None if config is None else (config.get("cpu") if hasattr(config, "get")
                                     else getattr(config, "cpu", None))
  for key, value in dict(cpu or {}).items():
    if key not in DEFAULTS:
      raise ValueError(f"config.cpu.{key}: unknown field; known: {', '.join(DEFAULTS)}")
    out[key] = value
  from sdl_jax.cpu import process  # pylint: disable=g-import-not-at-top
  env = os.environ.get(MALLOC_ENV, "").strip()
  out["malloc"] = (process.check_malloc(env, f"${MALLOC_ENV}") if env
                   else process.check_malloc(out["malloc"], "config.cpu.malloc"))
  return out


def configure(config=None) -> dict[str, Any]:
  """Sets up this process for ``config.cpu`` (see the package docstring): the models'
  paths and oneDNN mode, then, unless JAX's backends have started already (a warning
  then), the XLA flags and the allocator. Call it once, first thing in an entry point.

  Returns:
    what was applied (also ``applied()``): the settings, plus ``xla_flags`` (appended),
    ``dropped_xla_flags`` (unknown to this jaxlib) and ``malloc_kept`` (bool).
  """
  from sdl_jax.cpu import dnnl_route, paths, process  # pylint: disable=g-import-not-at-top
  s = settings(config)
  paths.set_default(s["kernels"])
  dnnl_route.set_default(s["dnnl"])
  out = dict(s, xla_flags=[], dropped_xla_flags=[], malloc_kept=process.freed_memory_kept())
  if _jax_started():
    _log.warning("sdl_jax.cpu.configure: JAX has started already; XLA flags and the "
                 "allocator are left as they are (call it before the first computation)")
  else:
    if s["fast_xla_flags"]:
      known = process.known_xla_flags(process.FAST_CPU_XLA_FLAGS)
      process.append_xla_flags(known, keep_user_values=True)
      out["xla_flags"] = known
      out["dropped_xla_flags"] = [f for f in process.FAST_CPU_XLA_FLAGS if f not in known]
    if s["malloc"] == "keep":
      out["malloc_kept"] = process.keep_freed_memory()
  _applied.clear()
  _applied.update(out)
  return dict(out)


def applied() -> dict[str, Any]:
  """What ``configure`` applied in this process; empty if it has not run."""
  return dict(_applied)


def _jax_started() -> bool:
  """Whether JAX has initialised a backend in this process (then XLA has read its flags)."""
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge._backends)  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    return False
