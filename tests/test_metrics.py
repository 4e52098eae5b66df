"""LDL measures and accuracy against plain NumPy definitions, and exact merging."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdl_jax import metrics as M


def _np_measures(l, p):
  """Geng (2016), written per example with explicit loops; 0 ln 0 = 0, 0/0 = 0."""
  out = {k: [] for k in M.LDL_MEASURES}
  for li, pi in zip(np.asarray(l, np.float64), np.asarray(p, np.float64)):
    out["chebyshev"].append(max(abs(a - b) for a, b in zip(li, pi)))
    clark = canb = kl = inter = 0.0
    for a, b in zip(li, pi):
      if a + b > 0:
        clark += (a - b)**2 / (a + b)**2
        canb += abs(a - b) / (a + b)
      if a > 0:
        kl += a * np.log(a / b)
      inter += min(a, b)
    out["clark"].append(np.sqrt(clark))
    out["canberra"].append(canb)
    out["kl"].append(kl)
    out["cosine"].append(np.dot(li, pi) / (np.linalg.norm(li) * np.linalg.norm(pi)))
    out["intersection"].append(inter)
  return {k: np.array(v) for k, v in out.items()}


def _np_extra_measures(l, p):
  """PyLDL's Euclidean, Sorensen, squared chi2, fidelity and Jensen-Shannon, per example
  with explicit loops over classes; 0 ln 0 = 0, 0/0 = 0."""
  out = {k: [] for k in M.EXTRA_MEASURES}
  for li, pi in zip(np.asarray(l, np.float64), np.asarray(p, np.float64)):
    sq = absdiff = total = chi2 = fid = js = 0.0
    for a, b in zip(li, pi):
      sq += (a - b)**2
      absdiff += abs(a - b)
      total += a + b
      if a + b > 0:
        chi2 += (a - b)**2 / (a + b)
      fid += np.sqrt(a * b)
      mid = (a + b) / 2
      for x in (a, b):
        if x > 0:
          js += 0.5 * x * np.log(x / mid)
    out["euclidean"].append(np.sqrt(sq))
    out["sorensen"].append(absdiff / total)
    out["squared_chi2"].append(chi2)
    out["fidelity"].append(fid)
    out["jensen_shannon"].append(js)
  return {k: np.array(v) for k, v in out.items()}


def _np_all_measures(l, p):
  return {**_np_measures(l, p), **_np_extra_measures(l, p)}


def test_hand_worked_example():
  l = np.array([[0.5, 0.5, 0.0]])
  p = np.array([[0.25, 0.5, 0.25]])
  got = {k: float(v[0]) for k, v in M.ldl_measures(l, p).items()}
  assert got["chebyshev"] == pytest.approx(0.25)
  # Clark: (0.25/0.75)^2 + 0 + (0.25/0.25)^2 = 1/9 + 1.
  assert got["clark"] == pytest.approx(np.sqrt(1 / 9 + 1))
  assert got["canberra"] == pytest.approx(1 / 3 + 1)
  assert got["kl"] == pytest.approx(0.5 * np.log(2))
  # l.p = 0.125 + 0.25 = 0.375; |l| = sqrt(0.5), |p| = sqrt(0.375).
  assert got["cosine"] == pytest.approx(0.375 / (np.sqrt(0.5) * np.sqrt(0.375)))
  assert got["intersection"] == pytest.approx(0.75)
  assert got["euclidean"] == pytest.approx(np.sqrt(0.25**2 + 0.25**2))
  # Sorensen: (0.25 + 0 + 0.25) / 2; squared chi2: 0.0625/0.75 + 0 + 0.0625/0.25.
  assert got["sorensen"] == pytest.approx(0.25)
  assert got["squared_chi2"] == pytest.approx(1 / 12 + 1 / 4)
  assert got["fidelity"] == pytest.approx(np.sqrt(0.125) + 0.5)
  # m = (0.375, 0.5, 0.125): JS = (0.5 ln(0.5/0.375) + 0.25 ln(0.25/0.375)
  #                               + 0.25 ln(0.25/0.125)) / 2.
  assert got["jensen_shannon"] == pytest.approx(
      (0.5 * np.log(4 / 3) + 0.25 * np.log(2 / 3) + 0.25 * np.log(2)) / 2)


def test_every_measure_has_a_direction():
  for k in ("accuracy",) + M.ALL_MEASURES:
    assert k in M.HIGHER_IS_BETTER, k
  assert M.HIGHER_IS_BETTER["fidelity"] and not M.HIGHER_IS_BETTER["jensen_shannon"]


def test_random_against_numpy_definitions():
  rng = np.random.default_rng(0)
  l = rng.dirichlet(np.ones(8) * 0.3, size=50)
  l[rng.random(l.shape) < 0.3] = 0
  l[:, 0] += 1e-3
  l /= l.sum(1, keepdims=True)
  p = rng.dirichlet(np.ones(8), size=50)
  got = M.ldl_measures(l, p)
  want = _np_all_measures(l, p)
  assert set(got) == set(M.ALL_MEASURES)
  for k in M.ALL_MEASURES:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_identical_distributions_give_ideal_values_and_bounds_hold():
  rng = np.random.default_rng(1)
  l = rng.dirichlet(np.ones(8), size=20)
  l[0] = [1, 0, 0, 0, 0, 0, 0, 0]
  got = M.ldl_measures(l, l)
  for k in ("chebyshev", "clark", "canberra", "kl", "euclidean", "sorensen", "squared_chi2",
            "jensen_shannon"):
    np.testing.assert_allclose(got[k], 0.0, atol=1e-6, err_msg=k)
  for k in ("cosine", "intersection", "fidelity"):
    np.testing.assert_allclose(got[k], 1.0, atol=1e-6, err_msg=k)
  p = rng.dirichlet(np.ones(8), size=20)
  got = M.ldl_measures(l, p)
  c = 8
  assert (got["chebyshev"] <= 1).all() and (got["clark"] <= np.sqrt(c)).all()
  assert (got["canberra"] <= c).all() and (got["kl"] >= 0).all()
  assert ((got["cosine"] >= 0) & (got["cosine"] <= 1 + 1e-6)).all()
  assert ((got["intersection"] >= 0) & (got["intersection"] <= 1 + 1e-6)).all()
  assert (got["euclidean"] <= np.sqrt(2)).all() and (got["sorensen"] <= 1).all()
  assert (got["squared_chi2"] <= 2).all() and (got["fidelity"] <= 1 + 1e-6).all()
  assert ((got["jensen_shannon"] >= 0) & (got["jensen_shannon"] <= np.log(2) + 1e-6)).all()


def test_zero_prediction_gives_finite_kl():
  got = M.ldl_measures(np.array([[1.0, 0.0]], np.float32), np.array([[0.0, 1.0]], np.float32))
  assert np.isfinite(got["kl"]).all() and float(got["kl"][0]) > 80


def test_accuracy_and_masked_sums_merge_exactly():
  rng = np.random.default_rng(2)
  n, c = 37, 8
  l = rng.dirichlet(np.ones(c), size=n).astype(np.float32)
  p = rng.dirichlet(np.ones(c), size=n).astype(np.float32)
  y = l.argmax(1)
  full = M.finalize(M.batch_sums(p, y, l))
  assert full["count"] == n
  assert full["accuracy"] == pytest.approx(np.mean(p.argmax(1) == y))
  want = _np_all_measures(l, p)
  for k in M.ALL_MEASURES:
    assert full[k] == pytest.approx(want[k].mean(), rel=1e-5), k
  # Batches of 8, the last padded with garbage rows (nan included) and masked.
  sums = None
  for s in range(0, n, 8):
    pb, lb, yb = p[s:s + 8], l[s:s + 8], y[s:s + 8]
    pad = 8 - len(pb)
    mask = np.r_[np.ones(len(pb)), np.zeros(pad)]
    pb = np.r_[pb, np.full((pad, c), np.nan, np.float32)]
    lb = np.r_[lb, np.zeros((pad, c), np.float32)]
    yb = np.r_[yb, -np.ones(pad, int)]
    sums = M.merge(sums, M.batch_sums(jnp.asarray(pb), jnp.asarray(yb), jnp.asarray(lb), mask))
  merged = M.finalize(sums)
  for k, v in full.items():
    assert merged[k] == pytest.approx(v, rel=1e-5), k


@pytest.mark.multidevice
def test_psum_across_devices_equals_whole():
  """The evaluation's reduction over ``jax.local_device_count()`` devices: each device sums
  its own masked rows (the last device's last row is padding), ``psum`` gives every device
  the global sums, and their means equal the NumPy definitions on the unpadded rows."""
  n_dev = jax.local_device_count()
  rng = np.random.default_rng(3)
  rows = 4 * n_dev
  l = rng.dirichlet(np.ones(4), size=rows).astype(np.float32)
  p = rng.dirichlet(np.ones(4), size=rows).astype(np.float32)
  y = l.argmax(1)
  y[::3] = p[::3].argmax(1)  # some right, some wrong
  mask = np.ones(rows, np.float32)
  mask[-1] = 0
  p[-1] = np.nan  # padding's garbage must not leak
  f = jax.pmap(lambda p, y, l, m: (M.batch_sums(p, y, l, m),
                                   jax.lax.psum(M.batch_sums(p, y, l, m), "d")),
               axis_name="d")
  sh = lambda x: x.reshape((n_dev, -1) + x.shape[1:])
  local, total = f(sh(p), sh(y), sh(l), sh(mask))
  # Each device counted its own rows only; every device holds the same global sums.
  np.testing.assert_array_equal(local["count"], [4.0] * (n_dev - 1) + [3.0])
  for k, v in total.items():
    np.testing.assert_array_equal(v, np.full(n_dev, v[0]), err_msg=k)
  got = M.finalize(jax.tree_util.tree_map(lambda x: x[0], total))
  assert got["count"] == rows - 1
  assert got["accuracy"] == pytest.approx(np.mean(p[:-1].argmax(1) == y[:-1]))
  want = _np_all_measures(l[:-1], p[:-1])
  for k in M.ALL_MEASURES:
    assert got[k] == pytest.approx(want[k].mean(), rel=1e-5), k


def test_finalize_empty_raises():
  with pytest.raises(ValueError, match="no examples"):
    M.finalize({"count": np.float32(0), "accuracy": np.float32(0)})
