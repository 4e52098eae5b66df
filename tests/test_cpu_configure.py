"""Nothing process-wide on ``import sdl_jax``; ``sdl_jax.cpu.configure`` applies
``config.cpu`` (XLA flags, glibc's allocator, the layers' and oneDNN's modes) explicitly."""

import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from sdl_jax import cpu
from sdl_jax.cpu import dnnl_route, paths, process

REPO = Path(__file__).resolve().parents[1]
GLIBC = platform.libc_ver()[0] == "glibc"

# Run in a fresh interpreter after the statements in {setup}: mallocs and frees 256 MiB
# twice on a new thread (as XLA's threads allocate a step's temporaries) and prints the page
# faults of each pass, whether sdl_jax.cpu applied anything, and $XLA_FLAGS.
_CHILD = """
import ctypes, json, os, resource, threading
{setup}
from sdl_jax import cpu
from sdl_jax.cpu import process
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size, faults = 256 * 2**20, []
def passes():
  for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=passes)
t.start()
t.join()
print(json.dumps(dict(applied=cpu.applied(), kept=process.freed_memory_kept(), faults=faults,
                      xla_flags=os.environ.get("XLA_FLAGS"))))
"""


def _child(setup: str, tmp_path, **env) -> dict:
  base = {k: v for k, v in os.environ.items()
          if k not in ("XLA_FLAGS", cpu.MALLOC_ENV, paths.ENV, dnnl_route.ENV)}
  base.update(PYTHONPATH=str(REPO), SDL_JAX_CACHE=str(tmp_path / "cache"), **env)
  proc = subprocess.run([sys.executable, "-c", _CHILD.format(setup=setup)], env=base,
                        capture_output=True, text=True, cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _page_faults_say_kept(faults) -> bool:
  """Whether the second 256 MiB pass reused the first's pages (kept) or faulted them in
  anew (glibc's defaults: one fault per 4 KiB page)."""
  pages = 256 * 2**20 // 4096
  assert faults[0] > pages // 2  # the first pass touches fresh memory either way
  assert faults[1] < pages // 20 or faults[1] > pages // 2, faults
  return faults[1] < pages // 20


def test_importing_the_library_changes_nothing_process_wide(tmp_path):
  user = "--xla_force_host_platform_device_count=1"
  out = _child("import sdl_jax, sdl_jax.models, sdl_jax.train", tmp_path, XLA_FLAGS=user)
  assert out["xla_flags"] == user
  assert out["applied"] == {} and out["kept"] is False
  if GLIBC:
    assert not _page_faults_say_kept(out["faults"])


@pytest.mark.parametrize("cpu_fields,env,want_flags", [
    ({}, {}, " ".join(process.FAST_CPU_XLA_FLAGS)),
    ({}, {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"},
     "--xla_cpu_experimental_ynn_fusion_type=individual_convolution "
     + process.FAST_CPU_XLA_FLAGS[1]),
    ({"fast_xla_flags": False}, {}, None),
])
def test_configure_appends_the_fast_flags_keeping_the_users(tmp_path, cpu_fields, env,
                                                            want_flags):
  setup = ("import ml_collections, sdl_jax.cpu\n"
           f"sdl_jax.cpu.configure(ml_collections.ConfigDict({{'cpu': {cpu_fields!r}}}))\n"
           "import jax; jax.devices()  # XLA reads the flags: it must accept them")
  out = _child(setup, tmp_path, **env)
  assert out["xla_flags"] == want_flags
  assert out["applied"]["dropped_xla_flags"] == []
  assert out["applied"]["malloc"] == "default" and out["kept"] is False


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
@pytest.mark.parametrize("malloc,env,kept", [
    ("keep", {}, True),
    ("default", {}, False),
    ("default", {"SDL_JAX_MALLOC": "keep"}, True),  # the environment overrides the config
    ("keep", {"SDL_JAX_MALLOC": "default"}, False),
])
def test_configure_keeps_freed_memory_only_when_asked(tmp_path, malloc, env, kept):
  setup = ("import ml_collections, sdl_jax.cpu\n"
           "sdl_jax.cpu.configure(ml_collections.ConfigDict("
           f"{{'cpu': {{'malloc': {malloc!r}, 'fast_xla_flags': False}}}}))")
  out = _child(setup, tmp_path, **env)
  assert out["kept"] is kept and out["applied"]["malloc_kept"] is kept
  assert out["applied"]["malloc"] == ("keep" if kept else "default")
  assert _page_faults_say_kept(out["faults"]) == kept


def test_unknown_xla_flag_is_dropped_with_a_warning_and_the_answer_cached(
    tmp_path, monkeypatch, caplog):
  monkeypatch.setenv("SDL_JAX_CACHE", str(tmp_path))
  made_up = "--xla_sdl_jax_made_up_flag=1"
  flags = [made_up, *process.FAST_CPU_XLA_FLAGS]
  with caplog.at_level(logging.WARNING, logger=process.__name__):
    assert process.known_xla_flags(flags) == list(process.FAST_CPU_XLA_FLAGS)
  assert f"XLA flag {made_up} dropped" in caplog.text
  assert not any(f in caplog.text for f in process.FAST_CPU_XLA_FLAGS)
  assert len(list(tmp_path.glob("xla_flags_*.json"))) == 1

  def no_probe(_):
    raise AssertionError("probed again: the answer was not cached")
  monkeypatch.setattr(process, "probe_xla_flags", no_probe)
  assert process.known_xla_flags(flags) == list(process.FAST_CPU_XLA_FLAGS)


def test_a_failed_probe_drops_the_flags_and_is_not_cached(tmp_path, monkeypatch, caplog):
  monkeypatch.setenv("SDL_JAX_CACHE", str(tmp_path))
  monkeypatch.setattr(process, "probe_xla_flags", lambda flags: None)
  assert process.known_xla_flags(["--xla_cpu_foo=1"]) == []
  assert list(tmp_path.iterdir()) == []


def test_probe_names_only_the_unknown_flags():
  unknown = process.probe_xla_flags(
      ["--xla_sdl_jax_other_made_up=2", process.FAST_CPU_XLA_FLAGS[1]])
  assert unknown == {"--xla_sdl_jax_other_made_up"}


def test_append_xla_flags_replaces_a_flag_of_the_same_name(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--a=1 --b=2")
  assert process.append_xla_flags(["--b=3", "--c"]) == "--a=1 --b=3 --c"
  assert os.environ["XLA_FLAGS"] == "--a=1 --b=3 --c"
  with pytest.raises(ValueError, match="must start with '--'"):
    process.append_xla_flags(["xla_cpu_foo=1"])
  assert process.append_xla_flags(["--b=4", "--d=5"], keep_user_values=True) == (
      "--a=1 --b=3 --c --d=5")


def test_settings_read_config_cpu_with_defaults_and_name_bad_fields(monkeypatch):
  monkeypatch.delenv(cpu.MALLOC_ENV, raising=False)
  assert cpu.settings(None) == cpu.DEFAULTS
  assert cpu.settings(ml_collections.ConfigDict({"lam": 0.8})) == cpu.DEFAULTS  # older config
  got = cpu.settings(ml_collections.ConfigDict({"cpu": {"dnnl": "off", "malloc": "Keep"}}))
  assert got == dict(cpu.DEFAULTS, dnnl="off", malloc="keep")
  with pytest.raises(ValueError, match="config.cpu.threads: unknown field"):
    cpu.settings(ml_collections.ConfigDict({"cpu": {"threads": 2}}))
  with pytest.raises(ValueError, match="config.cpu.malloc='never'"):
    cpu.settings(ml_collections.ConfigDict({"cpu": {"malloc": "never"}}))
  monkeypatch.setenv(cpu.MALLOC_ENV, "sometimes")
  with pytest.raises(ValueError, match=r"\$SDL_JAX_MALLOC='sometimes'"):
    cpu.settings(None)


def test_the_project_config_has_the_cpu_fields(monkeypatch):
  monkeypatch.delenv(cpu.MALLOC_ENV, raising=False)
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("sdl_configs", REPO / "configs" / "sdl.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert set(module.get_config().cpu.keys()) == set(cpu.DEFAULTS)
  assert cpu.settings(module.get_config()) == cpu.DEFAULTS


def test_configure_after_jax_started_sets_the_modes_and_warns(monkeypatch, caplog):
  import jax  # pylint: disable=g-import-not-at-top
  jax.devices()  # started
  monkeypatch.setattr(paths, "_configured", "auto")  # restored after the test
  monkeypatch.setattr(dnnl_route, "_configured", "auto")
  monkeypatch.delenv(paths.ENV, raising=False)
  monkeypatch.delenv(dnnl_route.ENV, raising=False)
  monkeypatch.delenv(cpu.MALLOC_ENV, raising=False)
  monkeypatch.setattr(cpu, "_applied", {})
  before = os.environ.get("XLA_FLAGS")
  with caplog.at_level(logging.WARNING):
    out = cpu.configure(ml_collections.ConfigDict(
        {"cpu": {"kernels": "xla", "dnnl": "off", "malloc": "keep"}}))
  assert "JAX has started already" in caplog.text
  assert os.environ.get("XLA_FLAGS") == before and out["xla_flags"] == []
  assert paths.mode() == "xla" and not paths.hand_paths() and dnnl_route.mode() == "off"
  assert cpu.applied() == out and out["malloc"] == "keep"
  with pytest.raises(ValueError, match="config.cpu.kernels='gpu'"):
    cpu.configure(ml_collections.ConfigDict({"cpu": {"kernels": "gpu"}}))
