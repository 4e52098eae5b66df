"""Shared test set-up: float64 is enabled per test where needed; TF never sees a GPU."""

import os

# Keep TensorFlow quiet and off any accelerator in tests.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
