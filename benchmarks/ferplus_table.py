"""Prints the FER+ tables of RESULTS.md from workdirs <root>/[evaldist_]lam{0.0,0.8}_seed{0,1} (mean ± half-range over seeds).

    python benchmarks/ferplus_table.py <root>
"""
import json, sys, statistics as st, os
root = sys.argv[1]
M = ["accuracy", "kl", "chebyshev", "clark", "canberra", "cosine", "intersection"]
def load(prefix, key):
  out = {}
  for lam in ("0.0", "0.8"):
    rows = []
    for seed in (0, 1):
      p = os.path.join(root, f"{prefix}lam{lam}_seed{seed}", "results.json")
      if os.path.exists(p):
        r = json.load(open(p))
        r = r["evaluation"]["model"] if key == "evaluation" else r["test"]
        rows.append((seed, r))
    out[lam] = rows
  return out
for title, prefix, key in [("majority test (3,137 images)", "", "test"),
                           ("distribution test (3,545 images)", "evaldist_", "evaluation")]:
  print(f"\n{title}\n")
  print("| lam | seeds | " + " | ".join(M) + " |")
  print("|---|---|" + "---|" * len(M))
  for lam, rows in load(prefix, key).items():
    if not rows: continue
    cells = []
    for m in M:
      v = [r[m] for _, r in rows]
      cells.append(f"{st.mean(v):.4f}" + (f" ± {(max(v)-min(v))/2:.4f}" if len(v) > 1 else ""))
    print(f"| {lam} | {','.join(str(s) for s,_ in rows)} | " + " | ".join(cells) + " |")
  for lam, rows in load(prefix, key).items():
    for s, r in rows:
      print(f"  lam {lam} seed {s}: " + ", ".join(f"{m} {r[m]:.4f}" for m in M))
