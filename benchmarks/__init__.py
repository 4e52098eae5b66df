"""The benchmark tool (``python -m benchmarks.run``) and the exploratory tools beside it."""

# Untimed steps of each framework before the exploratory tools (ab, profile, primitives)
# time any: the first two steps of a large model page-fault its buffers in (ResNet-50 with
# every convolution on oneDNN: 0.75M and 0.71M minor faults, its second step 2.9 s slower
# than its third; session 16).
WARMUP_STEPS = 3
