"""The benchmark tool (``python -m benchmarks.run``) and the exploratory tools beside it."""

import json

# Untimed steps of each framework before the exploratory tools (ab, profile, primitives)
# time any: the first steps of a large model page-fault its buffers in (ResNet-50 with
# every convolution on oneDNN: 0.68M minor faults and +1.4 s in its first step, and with
# the weight gradients unordered also 0.71M in its second).
WARMUP_STEPS = 3


def warm_up(trainer, steps: int = WARMUP_STEPS) -> None:
  """Runs ``steps`` untimed steps of a ``JaxTrainer`` or ``TorchTrainer`` and waits for
  them."""
  for _ in range(steps):
    trainer.step()
  trainer.sync()


def write_report(report: dict, text: str, out: str = "") -> dict:
  """Prints the markdown ``text`` and, if ``out``, writes ``report`` there as JSON;
  returns ``report``."""
  print(text, flush=True)
  if out:
    with open(out, "w") as f:
      json.dump(report, f, indent=1)
  return report
