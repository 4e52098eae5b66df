"""Prints the FER+ tables of RESULTS.md (mean ± half-range over seeds) from the workdirs
``<root>/<prefix>lam{0.0,0.8}_seed<s>``:

* ``lam..._seed..``: the training run and its own test numbers (majority split; mirrored
  if its config had ``eval_flip``), used when no ``evalmaj_noflip_`` copy exists;
* ``evalmaj_noflip_...`` / ``evalmaj_flip_...``: ``--mode=evaluate`` copies on the
  majority test split, without / with mirroring (``--config.eval_flip``);
* ``evaldist_noflip_...`` / ``evaldist_...``: the same on the distribution-protocol test
  split (``evaldist_`` as the preset evaluates, mirrored if its config says so).

    python benchmarks/ferplus_table.py <root> [seeds, default 0,1]
"""
import json
import os
import statistics as st
import sys

M = ["accuracy", "kl", "chebyshev", "clark", "canberra", "cosine", "intersection"]
PREFIXES = ("evalmaj_noflip_", "evalmaj_flip_", "", "evaldist_noflip_", "evaldist_")


def load(root, seeds):
  """{(title): {lam: [(seed, measures)]}}, titled by split, mirroring and source."""
  groups = {}
  for prefix in PREFIXES:
    for lam in ("0.0", "0.8"):
      for seed in seeds:
        d = os.path.join(root, f"{prefix}lam{lam}_seed{seed}")
        if not os.path.exists(os.path.join(d, "results.json")):
          continue
        with open(os.path.join(d, "results.json")) as f:
          r = json.load(f)
        if prefix:
          if "evaluation" not in r:
            continue
          ev = r["evaluation"]
          measures, count, flip = ev["model"], ev["count"], ev.get("eval_flip", False)
          source = ""
        else:
          with open(os.path.join(d, "config.json")) as f:
            flip = json.load(f).get("eval_flip", False)
          measures, count, source = r["test"], r["test"]["count"], ", the training run's own"
        split = "distribution" if "dist" in prefix else "majority"
        title = (f"{split} test ({count:,} images), "
                 f"{'mirrored' if flip else 'no mirroring'}{source}")
        groups.setdefault(title, {}).setdefault(lam, []).append((seed, measures))
  return groups


def main(root, seeds):
  for title, table in load(root, seeds).items():
    print(f"\n{title}\n")
    print("| lam | seeds | " + " | ".join(M) + " |")
    print("|---|---|" + "---|" * len(M))
    for lam, rows in table.items():
      cells = []
      for m in M:
        v = [r[m] for _, r in rows]
        cells.append(f"{st.mean(v):.4f}" + (f" ± {(max(v) - min(v)) / 2:.4f}" if len(v) > 1 else ""))
      print(f"| {lam} | {','.join(str(s) for s, _ in rows)} | " + " | ".join(cells) + " |")
    for lam, rows in table.items():
      for s, r in rows:
        print(f"- lam {lam}, seed {s}: " + ", ".join(f"{m} {r[m]:.4f}" for m in M))


if __name__ == "__main__":
  main(sys.argv[1], [int(s) for s in (sys.argv[2] if len(sys.argv) > 2 else "0,1").split(",")])
