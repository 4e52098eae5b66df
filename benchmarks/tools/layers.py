"""One convolution layer's forward + backward, the library's against PyTorch's, side by side.

For each layer ``H,Cin,Cout,K[,S[,G]]`` (square ``H x H`` input, ``K x K`` kernel, stride
``S``, ``G`` groups; ``G = Cin = Cout`` is depthwise) it times, interleaved in one process
(medians of ``--repeats``):

* JAX: ``jax.grad`` of ``0.5 * sum(conv(x, w)^2)`` with respect to ``x`` and ``w``, the
  convolution being the models' ``sdl_jax.models.layers.conv_general_dilated`` (so the
  library's 1x1, depthwise and strided paths on the CPU), jitted;
* PyTorch: ``conv2d`` on channels-last tensors, the same loss, ``backward()``
  (part ``step``).

With ``--split`` each direction is timed on its own instead, as rows ``forward``,
``input grad`` and ``weight grad`` (JAX: one jitted function each, the gradients through
``jax.vjp`` with the same fixed output gradient on both sides; PyTorch: ``conv2d`` under
``no_grad`` and ``aten.convolution_backward`` for one of its two outputs), to show which
of the three kernels a gap sits in. With ``--pre`` the forward pass and the weight
gradient include ``pre`` on both sides; the input gradient is the convolution's own.

Both with ``--pre``: ``relu(1.1 x + 0.1)`` in front of the convolution, as the BatchNorm and
ReLU a model puts there (JAX may fuse it into the gradient's passes; PyTorch runs it
apart). ``SAME`` padding (``K // 2``). The default layers are ResNet-50's convolutions at
batch 32. Prints a markdown table; returns the rows.

    python -m benchmarks.tools.layers --batch=32 --repeats=5
    python -m benchmarks.tools.layers --layers="56,64,64,3;112,96,96,3,2,96"
    python -m benchmarks.tools.layers --split --pre=no --layers="64,32,32,3;56,64,64,3"
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from sdl_jax import cpu, perf

RESNET50 = ("56,64,64,3;28,128,128,3;14,256,256,3;7,512,512,3;"
            "56,64,256,1;56,256,64,1;28,512,128,1;28,128,512,1;14,1024,256,1;14,256,1024,1;"
            "7,2048,512,1;7,512,2048,1")


def parse_layers(text: str) -> list[tuple[int, ...]]:
  """``'H,Cin,Cout,K[,S[,G]];...'`` -> ``[(H, Cin, Cout, K, S, G), ...]``."""
  layers = []
  for item in filter(None, (t.strip() for t in text.split(";"))):
    try:
      v = [int(t) for t in item.split(",")]
    except ValueError:
      v = []
    if not 4 <= len(v) <= 6 or min(v) < 1:
      raise ValueError(f"--layers: {item!r} is not H,Cin,Cout,K[,S[,G]] of positive integers")
    h, cin, cout, k = v[:4]
    s = v[4] if len(v) > 4 else 1
    g = v[5] if len(v) > 5 else 1
    if cin % g or cout % g:
      raise ValueError(f"--layers: {item!r}: groups {g} must divide Cin and Cout")
    layers.append((h, cin, cout, k, s, g))
  if not layers:
    raise ValueError("--layers: no layer given")
  return layers


def _inputs(h, cin, cout, k, g, batch, seed):
  """The layer's input ``[batch, h, h, cin]`` and weights ``[k, k, cin / g, cout]`` (float32
  NumPy, NHWC / HWIO) and the generator that drew them: both sides take the same."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, h, h, cin)).astype(np.float32)
  w = (rng.normal(size=(k, k, cin // g, cout)) * 0.1).astype(np.float32)
  return rng, x, w


def _jax_conv(k, s, g):
  """The models' convolution (``SAME`` padding ``k // 2``, stride ``s``, ``g`` groups)."""
  from sdl_jax.models.layers import conv_general_dilated  # pylint: disable=g-import-not-at-top
  return lambda x, w: conv_general_dilated(x, w, (s, s), [(k // 2, k // 2)] * 2,
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                           feature_group_count=g)


def _pre(x, relu):
  """``relu(1.1 x + 0.1)``, as a model's BatchNorm + ReLU before a convolution (either library)."""
  return relu(1.1 * x + 0.1)


def _jax_step(h, cin, cout, k, s, g, batch, pre, seed=0):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  _, x, w = _inputs(h, cin, cout, k, g, batch, seed)
  x, w, conv = jnp.asarray(x), jnp.asarray(w), _jax_conv(k, s, g)

  def loss(x, w):
    y = conv(_pre(x, jax.nn.relu) if pre else x, w)
    return 0.5 * jnp.sum(y * y)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  jax.block_until_ready(grad(x, w))
  return lambda: jax.block_until_ready(grad(x, w))


def _jax_parts(h, cin, cout, k, s, g, batch, pre, seed=0):
  """``{part: call}`` timing the forward pass, input gradient and weight gradient apart;
  each call returns its result (NHWC, or HWIO for the weight gradient)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rng, x, w = _inputs(h, cin, cout, k, g, batch, seed)
  x, w, conv = jnp.asarray(x), jnp.asarray(w), _jax_conv(k, s, g)
  pre_fn = (lambda x: _pre(x, jax.nn.relu)) if pre else (lambda x: x)
  dy = jnp.asarray(rng.normal(size=jax.eval_shape(conv, x, w).shape).astype(np.float32))
  # The input gradient is the convolution's own (with respect to pre(x), which it does not
  # need); the forward pass and the weight gradient compute pre(x) inside, fusable.
  input_grad = lambda w, dy: jax.vjp(lambda x_: conv(x_, w), x)[1](dy)[0]
  weight_grad = lambda x, dy: jax.vjp(lambda w_: conv(pre_fn(x), w_), w)[1](dy)[0]
  fns = {"forward": (jax.jit(lambda x, w: conv(pre_fn(x), w)), (x, w)),
         "input grad": (jax.jit(input_grad), (w, dy)),
         "weight grad": (jax.jit(weight_grad), (x, dy))}
  calls = {}
  for part, (fn, args) in fns.items():
    jax.block_until_ready(fn(*args))
    calls[part] = lambda fn=fn, args=args: jax.block_until_ready(fn(*args))
  return calls


def _torch_tensors(x, w):
  """NHWC input and HWIO weights (NumPy) as PyTorch's channels-last NCHW and OIHW."""
  import torch  # pylint: disable=g-import-not-at-top
  return (torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last),
          torch.from_numpy(w).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last))


def _torch_parts(h, cin, cout, k, s, g, batch, pre, seed=0):
  """PyTorch's ``{part: call}`` for the same three, on channels-last tensors; each call
  returns its result (NCHW, or OIHW for the weight gradient)."""
  import torch  # pylint: disable=g-import-not-at-top
  rng, x, w = _inputs(h, cin, cout, k, g, batch, seed)
  x, w = _torch_tensors(x, w)
  conv = lambda xx: torch.nn.functional.conv2d(xx, w, stride=s, padding=k // 2, groups=g)
  with torch.no_grad():
    n, c, ho, wo = conv(x).shape
  # The same output gradient as _jax_parts' (the generator's next draw, NHWC).
  dy = torch.from_numpy(rng.normal(size=(n, ho, wo, c)).astype(np.float32))
  dy = dy.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
  pre_fn = (lambda x: _pre(x, torch.relu)) if pre else (lambda x: x)

  def backward(mask):
    # Given the convolution's input pre(x), computed here as in the forward part.
    with torch.no_grad():
      return torch.ops.aten.convolution_backward(dy, pre_fn(x), w, None, [s, s],
                                                 [k // 2, k // 2], [1, 1], False, [0, 0],
                                                 g, mask)

  def forward():
    with torch.no_grad():
      return conv(pre_fn(x))

  calls = {"forward": forward, "input grad": lambda: backward([True, False, False])[0],
           "weight grad": lambda: backward([False, True, False])[1]}
  for call in calls.values():
    call()
  return calls


def _torch_step(h, cin, cout, k, s, g, batch, pre, seed=0):
  import torch  # pylint: disable=g-import-not-at-top
  _, x, w = _inputs(h, cin, cout, k, g, batch, seed)
  x, w = (t.requires_grad_() for t in _torch_tensors(x, w))

  def step():
    xx = _pre(x, torch.relu) if pre else x
    y = torch.nn.functional.conv2d(xx, w, stride=s, padding=k // 2, groups=g)
    (0.5 * (y * y).sum()).backward()
    x.grad = None
    w.grad = None

  step()
  return step


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(prog="python -m benchmarks.tools.layers",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--layers", default=RESNET50,
                 help="';'-separated H,Cin,Cout,K[,S[,G]] (default: ResNet-50's convolutions)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--pre", choices=("both", "yes", "no"), default="both",
                 help="relu(1.1 x + 0.1) in front of the convolution: with, without, or both")
  p.add_argument("--split", action="store_true",
                 help="time the forward pass, input gradient and weight gradient apart")
  p.add_argument("--torch_threads", type=int, default=0, help="0: one per CPU")
  args = p.parse_args(argv)
  cpu.configure()  # before JAX starts: XLA flags, allocator
  layers = parse_layers(args.layers)
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.torch_threads or perf.cpu_count())
  pres = {"both": (False, True), "yes": (True,), "no": (False,)}[args.pre]
  rows = []
  print(f"CPU: {perf.cpu_model()} ({', '.join(perf.cpu_isa()) or 'ISA unknown'}), "
        f"{perf.cpu_count()} CPUs usable; batch {args.batch}, {args.repeats} repeats\n",
        flush=True)
  print("| layer (H, Cin->Cout, KxK/S, groups) | pre | part | JAX ms (min-max) "
        "| PyTorch ms (min-max) | PyTorch/JAX time |\n|---|---|---|---|---|---|", flush=True)
  for h, cin, cout, k, s, g in layers:
    for pre in pres:
      spec = (h, cin, cout, k, s, g, args.batch, pre)
      if args.split:
        sides = {"jax": _jax_parts(*spec), "torch": _torch_parts(*spec)}
      else:
        sides = {"jax": {"step": _jax_step(*spec)}, "torch": {"step": _torch_step(*spec)}}
      for part in sides["jax"]:
        steps = {name: calls[part] for name, calls in sides.items()}
        times = {name: [] for name in steps}
        for r in range(args.repeats):
          for name in (steps if r % 2 == 0 else reversed(list(steps))):
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
        med = {name: float(np.median(t)) for name, t in times.items()}
        row = {"layer": [h, cin, cout, k, s, g], "pre": pre, "part": part,
               "batch": args.batch, "jax_s": times["jax"], "torch_s": times["torch"],
               "ratio": med["torch"] / med["jax"]}
        rows.append(row)
        fmt = lambda t: f"{1e3 * np.median(t):.1f} ({1e3 * min(t):.1f}-{1e3 * max(t):.1f})"
        print(f"| {h}, {cin}->{cout}, {k}x{k}/{s}, {g} | {'yes' if pre else 'no'} | {part} "
              f"| {fmt(times['jax'])} | {fmt(times['torch'])} | {row['ratio']:.2f}x |",
              flush=True)
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
