r"""Writes a shipped model (``NAME.msgpack`` + ``NAME.json``) from a training work directory.

    python -m sdl_jax.pretrained.export --workdir=W --name=ferplus \
        --data_path=../shared/data/ferplus.tar.gz \
        --trained_command="python run.py --config=configs/sdl.py:ferplus ..." \
        --trained_commit=8dc0d43 [--out_dir=sdl_jax/pretrained]

restores ``W``'s best checkpoint, rounds its parameters to float16 (BatchNorm statistics
stay float32), writes the two files, then loads them back through
``sdl_jax.pretrained.load`` (checking the digest) and measures the stored model on the
test split of the data it was trained on (``--data_path`` where that data lives now), so
the measures recorded in ``NAME.json`` are those of the weights users get. The float32
checkpoint's measures are recorded beside them. Also recorded: the model's distribution
for ``sdl_jax.pretrained.reference_image()``, which the tests compare against to catch any change of a
shipped model's predictions.
"""

from __future__ import annotations

import datetime
import io
import json
import os
from typing import Any

from absl import app
from absl import flags
from absl import logging
import numpy as np

from sdl_jax import pretrained

def stored_variables(variables) -> dict:
  """The variables as shipped: ``params`` float16, everything else float32 (numpy)."""
  import jax  # pylint: disable=g-import-not-at-top
  out = {}
  for collection, tree in variables.items():
    dtype = np.float16 if collection == "params" else np.float32
    out[collection] = jax.tree_util.tree_map(lambda a, d=dtype: np.asarray(a, d), tree)
  return out


def _measures(trained, builder) -> dict[str, float]:
  from sdl_jax import evaluate  # pylint: disable=g-import-not-at-top
  pred = evaluate.predict_split(trained, builder, "test")
  values = evaluate.model_measures(pred["probs"], pred["label"], pred["distribution"])
  values["count"] = int(pred["probs"].shape[0])
  return {k: float(v) if k != "count" else v for k, v in values.items()}


def export(workdir: str, name: str, out_dir: str, *, data_path: str | None = None,
           cache_dir: str | None = None, source: dict[str, Any] | None = None
           ) -> dict[str, Any]:
  """Writes ``out_dir/NAME.msgpack`` and ``out_dir/NAME.json``; returns the metadata."""
  import flax.serialization  # pylint: disable=g-import-not-at-top
  from sdl_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from sdl_jax import evaluate  # pylint: disable=g-import-not-at-top
  from sdl_jax.predict import Predictor  # pylint: disable=g-import-not-at-top
  trained = evaluate.load_trained(workdir, which="best")
  config = trained.config
  with config.unlocked():
    if data_path:
      config.data.path = data_path
    if cache_dir:
      config.data.cache_dir = cache_dir
  os.makedirs(out_dir, exist_ok=True)
  blob = flax.serialization.msgpack_serialize(stored_variables(trained.variables))
  weights = os.path.join(out_dir, name + ".msgpack")
  with open(weights, "wb") as f:
    f.write(blob)
  meta = {
      "format": pretrained.FORMAT,
      "name": name,
      "names": list(trained.names),
      "sha256": pretrained.sha256_file(weights),
      "bytes": len(blob),
      "stored_dtype": {"params": "float16", "batch_stats": "float32"},
      "config": json.loads(config.to_json_best_effort()),
      "source": dict(source or {}, step=trained.step,
                     exported=datetime.date.today().isoformat()),
  }
  meta_path = os.path.join(out_dir, name + ".json")
  _write_json(meta_path, meta)

  builder = data_lib.get_builder(config.data)
  shipped = pretrained.load(name, out_dir)
  meta["test"] = _measures(shipped, builder)
  meta["test_float32_checkpoint"] = _measures(trained, builder)
  predictor = Predictor.from_trained(shipped)
  meta["reference"] = {
      "image": "sdl_jax.pretrained.reference_image()",
      "distribution": [float(p) for p in
                       predictor.predict_arrays([pretrained.reference_image()])[0]],
  }
  # Where the data lived on the exporting machine says nothing to a user of the model.
  meta["config"]["data"]["path"] = meta["config"]["data"]["cache_dir"] = None
  _write_json(meta_path, meta)
  logging.info("wrote %s (%d bytes) and %s; test %s", weights, len(blob), meta_path,
               {k: round(v, 4) for k, v in meta["test"].items() if k in ("accuracy", "kl")})
  return meta


def _write_json(path: str, obj) -> None:
  buf = io.StringIO()
  json.dump(obj, buf, indent=1, sort_keys=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(buf.getvalue() + "\n")
  os.replace(tmp, path)


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "The training work directory to export (its best "
                      "checkpoint).", required=True)
  flags.DEFINE_string("name", None, "The model's name (file stem).", required=True)
  flags.DEFINE_string("out_dir", pretrained.HERE, "Where to write the two files.")
  flags.DEFINE_string("data_path", None, "Where the training data lives now "
                      "(config.data.path), for the test measures; default: as saved.")
  flags.DEFINE_string("cache_dir", None, "config.data.cache_dir for the test split's build.")
  flags.DEFINE_string("trained_command", "", "The command that trained the workdir.")
  flags.DEFINE_string("trained_commit", "", "The commit it was trained at.")
  flags.DEFINE_string("data_note", "", "The data and split, in words.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from sdl_jax import cpu  # pylint: disable=g-import-not-at-top
  cpu.configure(None)
  f = flags.FLAGS
  export(f.workdir, f.name, f.out_dir, data_path=f.data_path, cache_dir=f.cache_dir,
         source={"command": f.trained_command, "commit": f.trained_commit,
                 "data": f.data_note})


if __name__ == "__main__":
  _define_flags()
  app.run(main)
