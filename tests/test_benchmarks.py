"""The benchmark tool: its helpers against plain references, and a smoke run at tiny sizes
that checks the output's structure (never its speeds)."""

import json
import mmap
import os
import platform
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdl_jax import perf
from sdl_jax.losses import sdl_loss

REPO = Path(__file__).resolve().parents[1]
# benchmarks/ is a folder of the repository, not part of the installed package.
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

HLO = """HloModule jit_f, entry_computation_layout={(f32[4]{0})->f32[]}

%region_0.1 (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.0 = f32[] add(%a, %b)
}

%fused_computation (param_0: f32[4]) -> f32[] {
  %param_0 = f32[4]{0} parameter(0)
  %exp.0 = f32[4]{0} exponential(%param_0)
  %constant.0 = f32[] constant(0)
  ROOT %reduce.0 = f32[] reduce(%exp.0, %constant.0), dimensions={0}, to_apply=%region_0.1
}

ENTRY %main.2 (x.1: f32[4]) -> f32[] {
  %x.1 = f32[4]{0} parameter(0)
  %neg.1 = f32[4]{0} negate(%x.1)
  ROOT %fusion = f32[] fusion(%neg.1), kind=kLoop, calls=%fused_computation
}
"""


def test_hlo_op_count_counts_real_instructions_only():
  # add (region), exp + reduce (fused body), negate + fusion (entry); parameters and
  # constants are free.
  assert perf.hlo_op_count(HLO) == {"total": 5, "entry": 2, "fusions": 1}


def _hlo_opcodes(hlo_text):
  """computation name -> opcodes of its instructions, read block by block (a plain
  reference for ``perf.hlo_op_count``: a computation is a header line ending in ``{``, its
  instructions, and a closing ``}``)."""
  blocks, name = {}, None
  for line in hlo_text.splitlines():
    if line.rstrip().endswith("{") and "(" in line and " = " not in line:
      name = "ENTRY" if line.startswith("ENTRY") else line.split()[0]
      blocks[name] = []
    elif line.strip() == "}":
      name = None
    elif name is not None and " = " in line:
      rhs = line.split(" = ", 1)[1]  # "f32[4]{0} negate(%x), ..."
      blocks[name].append(rhs.split("(", 1)[0].split()[-1])
  return blocks


def test_hlo_op_count_of_a_compiled_function():
  compiled = jax.jit(lambda x: jnp.sum(jnp.exp(-x))).lower(jnp.ones(4)).compile()
  text = compiled.as_text()
  blocks = _hlo_opcodes(text)
  free = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}
  ops = {k: [op for op in v if op not in free] for k, v in blocks.items()}
  # The program's own operations are all there, wherever XLA fused them.
  assert {"negate", "exponential", "reduce", "add"} <= {op for v in ops.values() for op in v}
  assert perf.hlo_op_count(text) == {
      "total": sum(len(v) for v in ops.values()), "entry": len(ops["ENTRY"]),
      "fusions": sum(v.count("fusion") for v in ops.values())}


def test_compiled_memory_and_flops_of_a_matmul():
  n = 64
  compiled = jax.jit(lambda a, b: a @ b).lower(jnp.ones((n, n)), jnp.ones((n, n))).compile()
  assert perf.compiled_flops(compiled) == pytest.approx(2 * n**3, rel=0.01)
  mem = perf.compiled_memory(compiled)
  assert mem["arguments"] == 2 * n * n * 4 and mem["outputs"] == n * n * 4
  assert mem["total"] == mem["arguments"] + mem["outputs"] + mem["temporaries"] - mem["aliased"]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux only")
def test_peak_rss_sees_a_temporary_allocation():
  # An anonymous map, not malloc: where glibc keeps freed memory (config.cpu.malloc='keep'),
  # a malloc'd block could reuse pages already resident.
  with perf.PeakRSS() as rss:
    m = mmap.mmap(-1, 32 * 2**20)  # 32 MiB, touched, then unmapped
    m.write(b"\1" * len(m))
    m.close()
  assert rss.growth is not None and rss.growth >= 24 * 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux only")
def test_timed_step_times_step_then_sync_and_their_memory():
  calls = []
  def step():
    calls.append("step")
    # An anonymous map, as in test_peak_rss_sees_a_temporary_allocation: memory malloc
    # keeps (config.cpu.malloc='keep') may already be resident.
    m = mmap.mmap(-1, 32 * 2**20)
    m.write(b"\1" * len(m))
    m.close()
  import time  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  seconds, growth = perf.timed_step(step, lambda: calls.append("sync"))
  assert calls == ["step", "sync"] and 0 < seconds <= time.perf_counter() - t0
  assert growth is not None and growth >= 24 * 2**20


def test_onednn_matmul_peak_is_a_rate_where_onednn_takes_the_dtype():
  from sdl_jax.cpu import dnnl_route  # pylint: disable=g-import-not-at-top
  flops = perf.onednn_matmul_peak(n=64, repeats=2, inner=2)
  if dnnl_route.takes(1):
    # Between a megaflop and a petaflop per second: a rate, not seconds or a count.
    assert flops is not None and 1e6 < flops < 1e15
  else:
    assert flops is None
  with dnnl_route.disabled():
    assert perf.onednn_matmul_peak(n=64, repeats=1, inner=1) is None


def test_jax_matmul_peak_is_a_rate():
  flops = perf.jax_matmul_peak(n=64, repeats=2, inner=2)
  assert 1e6 < flops < 1e15  # a rate, not seconds or a count


def test_cpu_isa_reads_the_flags_line_in_a_fixed_order():
  text = ("processor\t: 0\nmodel name\t: Some CPU\n"
          "flags\t\t: fpu sse2 avx512f fma avx2 amx_tile amx_bf16 avx512_bf16x\n")
  # avx512_bf16x is another flag: whole words only; the order is ISA_FLAGS'.
  assert perf.cpu_isa(text) == ["avx2", "fma", "avx512f", "amx_bf16"]
  assert perf.cpu_isa("processor\t: 0\nflags\t: fpu sse2\n") == []
  assert perf.cpu_isa("no flags here") == []
  assert set(perf.cpu_isa()) <= set(perf.ISA_FLAGS)


def _torch_inputs(n=6, c=5, seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n, c)).astype(np.float32)
  labels = rng.integers(0, c, n).astype(np.int64)
  labels[-1] = -1  # A padded row.
  d = rng.random((n, c)).astype(np.float32)
  d /= d.sum(1, keepdims=True)
  d[-1] = 0
  return logits, labels, d


def test_torch_loss_equals_sdl_loss_value_and_gradient():
  torch = pytest.importorskip("torch")
  from benchmarks.torch_train import sdl_loss as torch_sdl_loss
  logits, labels, d = _torch_inputs()
  t = torch.tensor(logits, requires_grad=True)
  loss = torch_sdl_loss(t, torch.tensor(labels), torch.tensor(d), 0.7)
  loss.backward()
  want, grad = jax.value_and_grad(sdl_loss)(jnp.asarray(logits), jnp.asarray(labels),
                                            jnp.asarray(d), 0.7)
  np.testing.assert_allclose(loss.item(), want, rtol=1e-5)
  np.testing.assert_allclose(t.grad.numpy(), grad, rtol=1e-5, atol=1e-7)
  # And against the formula itself: (p * sum(t) - t) / N, zero on the padded row.
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  y = np.eye(5)[np.maximum(labels, 0)] * (labels >= 0)[:, None]
  target = 0.3 * y + 0.7 * d
  np.testing.assert_allclose(t.grad.numpy(), (p * target.sum(1, keepdims=True) - target) / 6,
                             rtol=1e-5, atol=1e-7)


def test_torch_trainer_steps_as_the_library_sgd():
  """The benchmark's PyTorch side (``TorchTrainer``) updates its weights as the library's
  ``optim.caffe_sgd`` does, given PyTorch's gradients of each step: the two sides of the
  benchmark run the same optimizer (at a constant rate, where Caffe's and PyTorch's
  momentum agree)."""
  torch = pytest.importorskip("torch")
  import optax  # pylint: disable=g-import-not-at-top
  from benchmarks.torch_train import TorchTrainer  # pylint: disable=g-import-not-at-top
  from benchmarks.train_bench import synthetic_batch  # pylint: disable=g-import-not-at-top
  from sdl_jax import optim  # pylint: disable=g-import-not-at-top
  lr, wd = 0.05, 0.01
  trainer = TorchTrainer("small_cnn", 5, *synthetic_batch(4, 16, 5), model_kwargs={
      "widths": [4]}, lr=lr, weight_decay=wd, lam=0.6)
  params = list(trainer.model.parameters())
  w0 = [p.detach().numpy().copy() for p in params]
  w = [jnp.asarray(x) for x in w0]
  tx = optim.caffe_sgd(lr, momentum=0.9, weight_decay=wd)
  state = tx.init(w)
  for _ in range(3):
    trainer.step()
    grads = [jnp.asarray(p.grad.numpy()) for p in params]
    updates, state = tx.update(grads, state, w)
    w = optax.apply_updates(w, updates)
  for p, want, before in zip(params, w, w0):
    got = p.detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert not np.allclose(got, before, rtol=1e-5, atol=1e-7)  # the steps moved it
  assert isinstance(trainer.opt, torch.optim.SGD)


def test_native_padding_keeps_the_function():
  torch = pytest.importorskip("torch")
  from benchmarks.torch_models import make_torch_model
  from benchmarks.torch_train import native_padding_
  model = make_torch_model("small_cnn", 4, widths=(4, 8)).eval()
  x = torch.randn(2, 3, 12, 12)
  want = model(x)
  model = native_padding_(model)
  assert not any(type(m).__name__ == "SameConv2d" for m in model.modules())
  torch.testing.assert_close(model(x), want)


@pytest.mark.slow
def test_smoke_run_writes_the_report_and_json(tmp_path):
  pytest.importorskip("torch")
  out, md = tmp_path / "bench.json", tmp_path / "bench.md"
  cmd = [sys.executable, "-m", "benchmarks.run", "--models=small_cnn", "--batch=4",
         "--small_cnn_size=16", '--model_kwargs={"widths": [8]}', "--repeats=2", "--steps=1",
         "--min_repeats=1", "--peak_n=128", "--loss_sizes=4x3,8x5", "--loss_repeats=1",
         "--loss_iters=50", "--pipeline_images=24", "--pipeline_batch=4",
         "--pipeline_batches=2", "--pipeline_image_size=16", "--pipeline_consumer=small_cnn",
         "--jpeg_size=64x48", "--memory_steps=2",
         "--memory_variants=small_cnn:remat+grad_accum=2", f"--out={out}",
         f"--markdown={md}"]
  env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2",
             SDL_JAX_MALLOC="keep")
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(out.read_text())

  assert res["env"]["local_devices"] >= 1 and res["env"]["devices"]
  assert res["env"]["torch_threads"] >= 1
  assert res["env"]["torch_process"] == "separate"
  # This process keeps freed memory ($SDL_JAX_MALLOC=keep, applied by sdl_jax.cpu.configure),
  # PyTorch's runs glibc's defaults (its child's configure reads its own $SDL_JAX_MALLOC).
  assert res["env"]["malloc_keep"] == (platform.libc_ver()[0] == "glibc")
  assert res["env"]["cpu_isa"] == perf.cpu_isa()
  from sdl_jax.cpu import dnnl_route  # pylint: disable=g-import-not-at-top
  assert res["env"]["dnnl"] == (dnnl_route.mode() if dnnl_route.available() else "off")
  assert 1e6 < res["peak"]["peak"] < 1e15
  assert res["peak"]["peak"] == max(res["peak"][k] for k in ("jax", "torch", "onednn")
                                    if k in res["peak"])

  (train,) = res["train"]
  assert "error" not in train, train.get("error")
  assert (train["model"], train["image_size"], train["batch"]) == ("small_cnn", 16, 4)
  for side in ("jax", "torch"):
    ips = train[side]["images_per_s"]
    assert len(ips["all"]) == 2 and ips["min"] <= ips["median"] <= ips["max"]
    assert 0 < train[side]["mfu"] < 1
    assert train[side]["mfu"] == pytest.approx(
        train[side]["model_tflop_per_s"] * 1e12 / res["peak"]["peak"])
  assert train["jax"]["params"] == train["torch"]["params"]  # the same architecture
  assert train["torch"]["malloc_keep"] is False
  assert 0 < train["jax"]["compile_s"] < 600
  # The step's buffers hold at least the parameters and their momentum (float32).
  assert train["jax"]["xla_memory"]["total"] >= 8 * train["jax"]["params"]
  assert train["ratio"] == pytest.approx(
      train["jax"]["images_per_s"]["median"] / train["torch"]["images_per_s"]["median"])

  _check_memory_rows(res["memory"])

  assert [r["shape"] for r in res["loss"]] == [[4, 3], [8, 5]]
  for r in res["loss"]:
    assert r["iters"] == 50  # --loss_iters
    for variant in ("custom_vjp", "autodiff"):
      v = r[variant]
      ops = v["hlo_ops"]
      # The entry's instructions, plus at least one in each fusion's body.
      assert ops["total"] >= ops["entry"] + ops["fusions"] and ops["entry"] >= 1
      for k in ("loop_us", "call_us"):
        assert len(v[k]) == 1  # --loss_repeats=1
        assert v[k + "_median"] == pytest.approx(np.median(v[k]))
    for k in ("loop", "call"):
      assert r[f"speedup_{k}"] == pytest.approx(
          r["autodiff"][f"{k}_us_median"] / r["custom_vjp"][f"{k}_us_median"])
    assert r["max_abs_diff"] < 1e-5

  assert [r["preset"] for r in res["pipeline"]] == ["paper", "ferplus"]
  for r in res["pipeline"]:
    assert "error" not in r, r.get("error")
    assert r["ratio"] == pytest.approx(r["images_per_s"] / r["consumer"]["images_per_s"])
    assert r["shapes"]["image"] == [res["env"]["local_devices"], 4 // res["env"]["local_devices"],
                                    16, 16, 3]
    # The train section measured this consumer (small_cnn, 16 px, batch 4) already.
    assert r["consumer"]["measured"] == "train section"

  report = md.read_text()
  for heading in ("## Train step", "## Training memory", "## Loss gradient alone",
                  "## Input pipeline"):
    assert heading in report
  assert "| small_cnn | 16 | 4 | float32 |" in report
  jax_peak, torch_peak = (res["memory"][0][s]["peak_rss"] for s in ("jax", "torch"))
  assert (f"| small_cnn | 16 | 4 | library | {jax_peak / 2**20:.0f} | "
          f"{torch_peak / 2**20:.0f} | {jax_peak / torch_peak:.2f}x |") in report
  assert "| small_cnn | 16 | 4 | remat+grad_accum=2 |" in report
  assert report.strip() in proc.stdout


def _check_memory_rows(rows):
  """The memory section's rows of the smoke run: each figure consistent with the others."""
  assert [(r["model"], r["variant"], r["remat"], r["grad_accum_steps"]) for r in rows] == [
      ("small_cnn", "library", False, 1), ("small_cnn", "remat+grad_accum=2", True, 2)]
  torch_side = rows[0]["torch"]
  for r in rows:
    assert "error" not in r["jax"], r["jax"].get("error")
    assert r["torch"] == torch_side  # one PyTorch process per model
    for side in (r["jax"], r["torch"]):
      assert len(side["rss_after_step"]) == len(side["step_s"]) == 2
      assert side["peak_rss"] == max(side["peak_rss_setup"], side["peak_rss_steps"])
      assert side["peak_rss_setup"] >= side["rss_before_steps"]
      assert side["peak_rss_steps"] >= max(side["rss_after_step"])
      # A Python process with a framework imported holds more than 50 MiB.
      assert side["rss_before_steps"] > 50 * 2**20
    assert r["jax"]["params"] == r["torch"]["params"]
    assert r["ratio"] == pytest.approx(r["jax"]["peak_rss"] / r["torch"]["peak_rss"])
    x = r["jax"]["xla"]
    assert x["total"] == x["arguments"] + x["outputs"] + x["temporaries"] - x["aliased"]
    # The donated state is reused for the new state: aliased bytes hold every parameter.
    assert x["aliased"] >= 4 * r["jax"]["params"]


@pytest.mark.slow
def test_torch_process_runs_the_trainer_in_a_child_and_reports_its_errors():
  pytest.importorskip("torch")
  from benchmarks import torch_process, torch_train  # pylint: disable=g-import-not-at-top
  from benchmarks.train_bench import synthetic_batch  # pylint: disable=g-import-not-at-top
  batch = synthetic_batch(4, 16, 5)
  kwargs = dict(model_kwargs={"widths": [8]}, lr=0.01, weight_decay=5e-4, lam=0.6,
                channels_last=True, bf16=False, device="cpu")
  here = torch_train.TorchTrainer("small_cnn", 5, *batch, **kwargs)
  child = torch_process.TorchProcess("small_cnn", 5, *batch, threads=1, **kwargs)
  try:
    assert child.num_params() == here.num_params()
    assert child.info["threads"] == 1
    # PyTorch's process runs glibc's allocator as it comes (malloc="default"), though
    # it imports sdl_jax.
    assert child.info["freed_memory_kept"] is False
    first = child.first_step()
    assert 0 < first["seconds"] < 600
    child.step()
    child.step()
    child.sync()
    assert child.peak_bytes() is None  # no CUDA here
  finally:
    child.close()
  assert not child._proc.is_alive()  # pylint: disable=protected-access
  with pytest.raises(RuntimeError, match="(?s)failed:.*no_such_model"):
    torch_process.TorchProcess("no_such_model", 5, *batch, threads=1, **kwargs)
  with pytest.raises(ValueError, match="malloc='sometimes'"):
    torch_process.TorchProcess("small_cnn", 5, *batch, threads=1, malloc="sometimes",
                               **kwargs)


def test_train_arrays_runs_the_library_steps_from_an_npz(tmp_path):
  """benchmarks/train_arrays.py (the GPU machine's training check): draws the synthetic set
  to .npz, trains from it, and evaluates every held-out image exactly once."""
  from benchmarks import train_arrays
  npz = str(tmp_path / "synth.npz")
  assert train_arrays.main([f"--npz={npz}", "--write", "--examples=120"]) == []
  history = train_arrays.main([f"--npz={npz}", "--epochs=2"])
  assert [h["epoch"] for h in history] == [1, 2]
  for h in history:
    assert h["train_count"] == (102 // 32) * 32 and h["count"] == 120 - 102
    assert all(np.isfinite(h[k]) for k in ("train_loss", "accuracy", "kl", "cosine"))
  assert history[1]["train_loss"] < history[0]["train_loss"]


def test_ab_times_every_variant_each_repeat():
  from benchmarks.tools import ab
  times = ab.main(["--model=small_cnn", "--batch=2", "--image_size=16", "--repeats=2",
                   "--steps=2", '--model_kwargs={"widths": [4, 8]}',
                   "--variants=library,kernels=xla+dnnl=off+xla_cpu_scheduler_type="
                   "CPU_SCHEDULER_TYPE_DEFAULT"])
  assert set(times) == {"library",
                        "kernels=xla+dnnl=off+xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT"}
  assert all(len(t) == 2 and 0 < min(t) and max(t) < 600 for t in times.values())
  for bad in ("speed=2", "lax", "norm=flax"):  # the removed layer variants among them
    with pytest.raises(ValueError, match=f"unknown setting '{bad}'"):
      ab.main(["--model=small_cnn", "--batch=2", "--image_size=16", f"--variants={bad}"])


def test_layers_times_both_sides_for_every_layer_and_rejects_bad_specs():
  from benchmarks.tools import layers
  rows = layers.main(["--layers=6,4,4,3;6,4,8,1;7,4,4,3,2,4", "--batch=2", "--repeats=2",
                      "--pre=both", "--torch_threads=1"])
  assert [(r["layer"], r["pre"]) for r in rows] == [
      ([6, 4, 4, 3, 1, 1], False), ([6, 4, 4, 3, 1, 1], True),
      ([6, 4, 8, 1, 1, 1], False), ([6, 4, 8, 1, 1, 1], True),
      ([7, 4, 4, 3, 2, 4], False), ([7, 4, 4, 3, 2, 4], True)]
  assert all(len(r["jax_s"]) == len(r["torch_s"]) == 2 and r["ratio"] == pytest.approx(
      np.median(r["torch_s"]) / np.median(r["jax_s"])) for r in rows)
  assert {r["part"] for r in rows} == {"step"}
  assert len(layers.parse_layers(layers.RESNET50)) == 12
  for bad, match in [("6,4,4", "H,Cin,Cout,K"), ("6,4,x,3", "H,Cin,Cout,K"),
                     ("6,4,6,3,1,4", "groups 4 must divide"), (" ; ", "no layer")]:
    with pytest.raises(ValueError, match=match):
      layers.parse_layers(bad)


def test_layers_split_times_each_direction_on_both_sides(capsys):
  from benchmarks.tools import layers
  rows = layers.main(["--layers=6,4,4,3;7,4,4,3,2,4", "--batch=2", "--repeats=2", "--pre=yes",
                      "--split", "--torch_threads=1"])
  parts = ["forward", "input grad", "weight grad"]
  assert [(r["layer"], r["part"]) for r in rows] == (
      [([6, 4, 4, 3, 1, 1], p) for p in parts] + [([7, 4, 4, 3, 2, 4], p) for p in parts])
  assert all(r["pre"] and len(r["jax_s"]) == len(r["torch_s"]) == 2 and r["ratio"] == (
      pytest.approx(np.median(r["torch_s"]) / np.median(r["jax_s"])))
             for r in rows)
  out = capsys.readouterr().out
  assert "| 7, 4->4, 3x3/2, 4 | yes | weight grad |" in out and "CPUs usable" in out
  # Both sides compute the same three results from the same inputs.
  for spec in [(6, 4, 4, 3, 1, 1), (7, 4, 4, 3, 2, 4), (6, 4, 8, 1, 1, 1)]:
    jax_parts = layers._jax_parts(*spec, batch=2, pre=True)
    torch_parts = layers._torch_parts(*spec, batch=2, pre=True)
    to_jax_layout = {"forward": (0, 2, 3, 1), "input grad": (0, 2, 3, 1),
                     "weight grad": (2, 3, 1, 0)}
    for part, axes in to_jax_layout.items():
      want = torch_parts[part]().permute(*axes).numpy()
      np.testing.assert_allclose(np.asarray(jax_parts[part]()), want, rtol=1e-4, atol=1e-4,
                                 err_msg=f"{spec} {part}")


PROFILE_HLO = """
  %ffi_call.3 = f32[2,8,8,4]{3,2,1,0} custom-call(%p.1, %p.2), custom_call_target="SdlDnnlConvFwd", metadata={op_name="jit(_fun)/jvp(SmallCNN)/conv0_0/ffi_call" stack_frame_id=1}
  %add_select_fusion.6 = f32[2,8,8,4]{3,2,1,0} fusion(%a, %b), kind=kLoop, calls=%fc.6, metadata={op_name="jit(_fun)/transpose(jvp(ResNet50))/layer1_2/bn3/jit(_where)/select_n"}
  ROOT %copy.1 = f32[4]{0} copy(%c)
"""


def test_profile_reads_ops_and_layers_from_the_hlo():
  from benchmarks.tools import profile
  ops = profile.hlo_ops(PROFILE_HLO)
  assert ops == {
      "ffi_call.3": {"kind": "oneDNN conv forward", "layer": "conv0_0", "direction": "forward"},
      "add_select_fusion.6": {"kind": "add_select_fusion", "layer": "layer1_2/bn3",
                              "direction": "backward"},
      "copy.1": {"kind": "copy", "layer": "", "direction": ""}}


def test_profile_interval_stats_against_a_dense_count():
  from benchmarks.tools import profile
  rng = np.random.default_rng(0)
  for _ in range(20):
    starts = rng.integers(0, 90, 6)
    intervals = [(int(s), int(s + rng.integers(1, 20))) for s in starts]
    depth = np.zeros(120, int)  # unit cells [t, t + 1)
    for s, e in intervals:
      depth[s:e] += 1
    assert profile._intervals_stats(intervals) == ((depth >= 1).sum(), (depth >= 2).sum())


def test_profile_summarises_a_trace_per_step():
  from benchmarks.tools import profile
  ops = profile.hlo_ops(PROFILE_HLO)
  events = [  # two steps; microseconds; one event not of the program, one not complete
      {"ph": "X", "name": "ffi_call.3", "ts": 0, "dur": 3000},
      {"ph": "X", "name": "add_select_fusion.6", "ts": 1000, "dur": 4000},
      {"ph": "X", "name": "ffi_call.3", "ts": 10000, "dur": 2000},
      {"ph": "X", "name": "ThunkExecutor::Execute", "ts": 0, "dur": 20000},
      {"ph": "i", "name": "copy.1", "ts": 0}]
  s = profile.summarise_trace(events, ops, steps=2)
  assert s["ops_ms"] == pytest.approx(4.5)
  assert s["busy_ms"] == pytest.approx(3.5) and s["concurrent_ms"] == pytest.approx(1.0)
  assert s["by_kind"] == [{"kind": "oneDNN conv forward", "ms": 2.5, "count": 1.0},
                          {"kind": "add_select_fusion", "ms": 2.0, "count": 0.5}]
  assert [(r["layer"], r["ms"]) for r in s["by_layer"]] == [("conv0_0 forward", 2.5),
                                                            ("layer1_2/bn3 backward", 2.0)]
  assert [(r["name"], r["kind"], r["direction"]) for r in s["ops"]] == [
      ("ffi_call.3", "oneDNN conv forward", "forward"),
      ("add_select_fusion.6", "add_select_fusion", "backward")]


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_profile_smoke_run_reports_the_step_op_by_op(tmp_path, framework):
  from benchmarks.tools import profile
  out = tmp_path / "prof.json"
  report = profile.main([f"--framework={framework}", "--model=small_cnn", "--batch=2",
                         "--image_size=16", '--model_kwargs={"widths": [4, 8]}',
                         "--steps=2", "--top=5", f"--out={out}"])
  assert json.loads(out.read_text()) == json.loads(json.dumps(report))
  r = report["result"]
  assert len(r["step_s"]) == 2
  assert r["wall_ms"] == pytest.approx(1e3 * np.median(r["step_s"]))
  assert 0 < r["ops_ms"] < 60_000
  names = [o["name"] for o in r["ops"]]
  if framework == "torch":
    assert any("convolution" in n for n in names)
    return
  kinds = {k["kind"] for k in r["by_kind"]}
  assert kinds & {"oneDNN conv forward", "convolution"}, kinds
  assert sum(k["ms"] for k in r["by_kind"]) == pytest.approx(r["ops_ms"])
  assert 0 < r["busy_ms"] <= r["ops_ms"] + 1e-6 and r["concurrent_ms"] <= r["busy_ms"]
  assert any(l["layer"].startswith("conv0_0") for l in r["by_layer"])


PRIMITIVE_LINES = [
    # oneDNN 3.2 (the library's), 3.12 (PyTorch's), jaxlib's gemm_api, and other output
    "onednn_verbose,exec,cpu,convolution,brgconv:avx2,forward_training,src_f32::blocked:"
    "acdb::f0 wei_f32:a:blocked:Acdb16a::f0 bia_undef::undef::: dst_f32::blocked:acdb::f0,"
    "attr-scratchpad:user ,alg:convolution_direct,mb32_ic32oc32_ih64oh64kh3sh1dh0ph1_iw64ow"
    "64kw3sw1dw0pw1,12.5",
    "onednn_verbose,exec,cpu,convolution,brgconv:avx2,forward_training,src_f32::blocked:"
    "acdb::f0,attr-scratchpad:user ,alg:convolution_direct,mb32_ic32oc32_ih64oh64kh3sh1dh0"
    "ph1_iw64ow64kw3sw1dw0pw1,14.5",
    "onednn_verbose,v1,primitive,exec,cpu,convolution,brg_conv_fwd:avx2,forward_training,"
    "src:f32::blocked:acdb::f0,attr-scratchpad:user,alg:convolution_direct,mb32_ic32oc32_"
    "ih64oh64kh3sh1dh0ph1_iw64ow64kw3sw1dw0pw1,13.0",
    "onednn_verbose,v1,primitive,exec,cpu,gemm_api,,undef,src_f32::blocked:ab:f0,,,"
    "96x320:320x32,0.25",
    "onednn_verbose,v1,primitive,create:cache_miss,cpu,convolution,jit:avx2,forward_training"
    ",src:f32,,alg:convolution_direct,mb32_ic3oc32,0.1",
    "onednn_verbose,info,cpu,isa:Intel AVX2",
    "some other output",
]


def test_primitives_parses_both_verbose_layouts_and_compares_medians():
  from benchmarks.tools import primitives
  calls = [primitives.parse_line(l) for l in PRIMITIVE_LINES]
  assert calls[4:] == [None, None, None]
  assert calls[0] == {"primitive": "convolution", "impl": "brgconv:avx2",
                      "direction": "forward_training",
                      "shape": "mb32_ic32oc32_ih64oh64kh3sh1dh0ph1_iw64ow64kw3sw1dw0pw1",
                      "ms": 12.5}
  assert calls[2]["impl"] == "brg_conv_fwd:avx2" and calls[2]["ms"] == 13.0
  assert calls[3]["primitive"] == "gemm_api"
  jax_rows = primitives.summarise(calls[:2] + calls[3:4], steps=2)
  torch_rows = primitives.summarise(calls[2:3], steps=1)
  key = ("convolution", "forward_training", "ic32oc32_ih64oh64kh3sh1dh0ph1_iw64ow64kw3sw1dw0pw1")
  assert jax_rows[key] == {"median_ms": 13.5, "per_step": 1.0, "ms_per_step": 13.5,
                           "impl": ["brgconv:avx2"]}
  assert jax_rows[("gemm_api", "", "")]["ms_per_step"] == 0.125
  rows = primitives.compare(jax_rows, torch_rows)
  conv = next(r for r in rows if r["primitive"] == "convolution")
  assert conv["ratio"] == pytest.approx(13.5 / 13.0)
  gemm = next(r for r in rows if r["primitive"] == "gemm_api")
  assert gemm["torch"] is None and gemm["ratio"] is None


@pytest.mark.slow
def test_primitives_smoke_run_matches_the_two_frameworks_calls(tmp_path):
  pytest.importorskip("torch")
  from benchmarks.tools import primitives
  from sdl_jax.cpu import dnnl_route
  out = tmp_path / "prims.json"
  report = primitives.main(["--model=small_cnn", "--batch=2", "--image_size=16",
                            "--steps=1", "--rounds=1", f"--out={out}"])
  assert json.loads(out.read_text()) == json.loads(json.dumps(report))
  assert all(0 < report["step_ms"][f] < 60_000 for f in ("jax", "torch"))
  convs = [r for r in report["rows"] if r["primitive"] == "convolution"]
  assert any(r["torch"] for r in convs)  # PyTorch's convolutions run on its oneDNN
  if dnnl_route.available():
    both = [r for r in convs if r["jax"] and r["torch"]]
    assert {r["direction"] for r in both} >= {"forward_training", "backward_data",
                                              "backward_weights"}
    assert all(r["ratio"] == pytest.approx(r["jax"]["median_ms"] / r["torch"]["median_ms"])
               for r in both)
