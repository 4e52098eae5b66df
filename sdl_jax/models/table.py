"""Parameter count and forward FLOPs of every backbone, as a Markdown table.

    python -m sdl_jax.models.table            # all models in MODEL_SPECS
    python -m sdl_jax.models.table resnet50   # some of them

For one image at the model's input size, inference mode, the table gives

- ``GMACs``: multiply-adds of every convolution and dense layer, counted analytically
  from the shapes each layer sees (``H_out * W_out * kh * kw * C_in / groups * C_out``
  for a conv, ``C_in * C_out`` for a dense layer), padded positions included. This is the
  number papers quote as "FLOPs" (ResNet-50: 4.1 G, VGG-16: 15.5 G, Lite0: 0.4 G).
- ``GFLOPs (XLA)``: XLA's cost analysis of the compiled forward pass
  (``jax.jit(f).lower(...).compile().cost_analysis()['flops']``, float32, current
  backend): two FLOPs per multiply-add, skipping products with padding, plus the
  elementwise work (BatchNorm, activations, pooling).
"""

from __future__ import annotations

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdl_jax import models
from sdl_jax.cpu import dnnl_route


def count_macs(model: nn.Module, x_shape, **apply_kwargs) -> int:
  """Multiply-adds of the ``nn.Conv`` and ``nn.Dense`` layers of ``model`` on an input of
  ``x_shape``, counted from shapes only (abstract evaluation, nothing is computed)."""
  total = 0

  def count(next_fun, args, kwargs, context):
    nonlocal total
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__":
      mod = context.module
      if isinstance(mod, nn.Conv):
        kernel = mod.get_variable("params", "kernel")  # [kh, kw, C_in / groups, C_out]
        total += int(np.prod(out.shape[:-1])) * int(np.prod(kernel.shape))
      elif isinstance(mod, nn.Dense):
        kernel = mod.get_variable("params", "kernel")  # [C_in, C_out]
        total += int(np.prod(out.shape[:-1])) * int(np.prod(kernel.shape))
    return out

  x = jax.ShapeDtypeStruct(tuple(x_shape), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, **apply_kwargs), x)

  def run(v, x):
    with nn.intercept_methods(count):
      return model.apply(v, x, **apply_kwargs)

  jax.eval_shape(run, variables, x)
  return total


def forward_macs(name: str, num_classes: int = 1000, input_size: int | None = None) -> int:
  """Conv + dense multiply-adds of ``get_model(name, num_classes)`` on one image."""
  size = input_size or models.get_spec(name).input_size
  return count_macs(models.get_model(name, num_classes), (1, size, size, 3), train=False)


def forward_flops(name: str, num_classes: int = 1000, input_size: int | None = None) -> float:
  """XLA's FLOP count of ``get_model(name, num_classes)`` on one image, inference mode.

  Traced with oneDNN off: XLA counts nothing inside a custom call, so with the
  convolutions on oneDNN the count would leave them out."""
  model = models.get_model(name, num_classes)
  size = input_size or models.get_spec(name).input_size
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
  with dnnl_route.disabled():
    compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per device
    cost = cost[0]
  return float(cost["flops"])


def backbone_rows(names=None, num_classes: int = 1000) -> list[dict]:
  """One dict per model: name, input_size, params (with a ``num_classes``-way head),
  gmacs (analytic) and gflops (XLA), forward, batch 1."""
  rows = []
  for name in names or models.MODEL_SPECS:
    model = models.get_model(name, num_classes)
    size = models.get_spec(name).input_size
    variables = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False))
    rows.append(dict(name=name, input_size=size, params=models.count_params(variables),
                     gmacs=forward_macs(name, num_classes) / 1e9,
                     gflops=forward_flops(name, num_classes) / 1e9))
  return rows


def markdown(rows) -> str:
  lines = ["| backbone | input | parameters | GMACs | GFLOPs (XLA) |",
           "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['name']} | {r['input_size']} | {r['params'] / 1e6:.2f} M "
                 f"| {r['gmacs']:.2f} | {r['gflops']:.2f} |")
  return "\n".join(lines)


def main(argv=None):
  names = (argv if argv is not None else sys.argv[1:]) or None
  print(markdown(backbone_rows(names)))
  print("\nOne image at the input size, 1000-way head. GMACs: conv + dense multiply-adds, "
        "counted from layer shapes; GFLOPs: XLA's cost analysis of the compiled forward "
        "(2 per multiply-add, padding skipped, elementwise ops included).")


if __name__ == "__main__":
  main()
