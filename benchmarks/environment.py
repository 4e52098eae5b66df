"""The benchmark's environment: the machine, the libraries, the settings that change the
figures (threads, kernels, allocator), and which device PyTorch runs on."""

from __future__ import annotations

import os
import platform
import sys
import time

from sdl_jax import perf
from sdl_jax.cpu import process


def environment(args, torch_device) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from sdl_jax.cpu import dnnl_lib, dnnl_route  # pylint: disable=g-import-not-at-top
  from sdl_jax.cpu import paths as kernels  # pylint: disable=g-import-not-at-top
  env = {
      "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
      "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
      "python": platform.python_version(),
      "platform": platform.platform(),
      "cpu": perf.cpu_model(),
      "cpu_isa": perf.cpu_isa(),
      "cpus": perf.cpu_count(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "local_devices": jax.local_device_count(),
      "device_kind": jax.local_devices()[0].device_kind,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "kernels": kernels.mode(),
      "hand_paths": kernels.hand_paths(),
      # Which convolutions the library sends to oneDNN here: all, xla_wgrad, grouped or off.
      "dnnl": dnnl_route.mode() if kernels.hand_paths() and dnnl_route.available() else "off",
      "onednn": (dnnl_lib.version_string()
                 if kernels.hand_paths() and dnnl_route.available() else None),
      # XLA:CPU runs one intra-op (Eigen) pool of one thread per CPU; no knob sizes it.
      "xla_threads": perf.cpu_count() if jax.default_backend() == "cpu" else None,
      # Whether glibc keeps freed memory in this process (sdl_jax.cpu.process.keep_freed_memory).
      "malloc_keep": process.freed_memory_kept(),
  }
  try:
    import flax  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top
    env["flax"], env["optax"] = flax.__version__, optax.__version__
  except ImportError:
    pass
  if torch_device:
    import torch  # pylint: disable=g-import-not-at-top
    env["torch"] = torch.__version__
    env["torch_device"] = torch_device
    env["torch_threads"] = torch.get_num_threads()
    env["torch_interop_threads"] = torch.get_num_interop_threads()
    env["torch_layout"] = args.torch_layout
    env["torch_process"] = args.torch_process
    env["torch_compile"] = args.torch_compile_mode if args.torch_compile else None
    env["torch_malloc_keep"] = (args.torch_malloc == "keep" if args.torch_process == "separate"
                                else env["malloc_keep"])
  return env



def pick_torch_device(args) -> str | None:
  if args.torch == "none":
    return None
  import jax  # pylint: disable=g-import-not-at-top
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("PyTorch is not installed: JAX side only.", file=sys.stderr)
    return None
  if args.torch == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and jax.default_backend() != "cpu":
      print(f"JAX runs on {jax.default_backend()} but PyTorch only on the CPU: "
            "no PyTorch comparison (pass --torch=cpu to force one).", file=sys.stderr)
      return None
    return device
  return args.torch
