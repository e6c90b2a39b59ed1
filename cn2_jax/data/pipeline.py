"""grain input pipelines producing numpy batches with the DESIGN.md batch contract (no JAX here).

This module gathers the pipeline's public names; the code lives in four modules:

* ``splits.py``: ``DetectionInfo``, ``DetectionSplit`` / ``open_split``, ``TrainPart`` (one
  dataset of a mixture) and the examples an epoch holds (``num_train_images``).
* ``schedule.py``: the per-step sampling schedules (plain, aspect-grouped and mixture epochs)
  and their numpy stream numbers (Determinism below).
* ``batcher.py``: decoding, resize / augmentation and padding of examples into batches
  (``BATCH_KEYS``, ``LSJ``; the train and eval batchers run in grain workers).
* ``loader.py``: the loaders: ``TrainLoaderSettings`` (``from_config``) and
  ``make_train_loader``, ``eval_plan`` / ``make_eval_loader`` / ``num_eval_batches``,
  ``train_padding_overhead``, ``default_pad_hw``.

Every batch (train and eval) follows the batch contract of docs/DESIGN.md (the single statement of
it: keys, shapes, dtypes). Padding examples of the last eval batch are all-zero images with
``batch_mask=False``, ``image_id=-1`` and ``image_hw`` = ``orig_hw`` = the canvas (never 0, so
ratios stay finite).

Determinism: the train stream is a pure function of ``(seed, step)``.  ``step`` selects a global
batch of ``batch_size * process_count`` examples (aspect-grouped epochs: ``_GroupedSchedule``; or
plain epochs of ``default_rng([seed, 0, epoch])`` permutations: ``_RandomSchedule``); process ``p``
takes slots ``[p * batch_size, (p + 1) * batch_size)``.  Slot ``j`` has the global example
position ``g = step * batch_size * process_count + j``, and its augmentation uses
``default_rng([seed, 1, g])``; the per-batch short side uses ``default_rng([seed, 3, step])``.
So ``start_step=N`` reproduces an uninterrupted run from step N for any ``num_workers``.
The optional one-stage augmentations (``augment.py``; off by default) draw from their own
``default_rng([seed, 4, g])``, so turning them on leaves the flips and short sides unchanged.

Several datasets (:class:`TrainPart`, ``data.mixture``; ``cn2_jax/data/mixture.py``): the train
loader also takes a list of parts, each a split with a sampling ``weight``, a ``channel_offset``
(its label ``i`` becomes ``gt_classes`` ``channel_offset + i``) and its own ``filter_empty``.
The parts are concatenated (one index space) and sampled per example slot by
``_MixtureSchedule``: slot ``g`` takes the dataset that grain's weighted interleaving
(``grain.MapDataset.mix``) puts at position ``g``, and the next image of that dataset's own
shuffled epochs (``default_rng([seed, 5, k, epoch])``), so it is again a pure function of
``(seed, step)``. A mixture is not aspect-grouped: a batch goes to the bucket of its images'
aspect group, or to the square fallback bucket when they differ (or to ``pad_hw``).

Padded shapes (``buckets.py``): training batches go to a bucket per short side and aspect group
(or one fixed ``pad_hw``); eval batches hold images of one official canvas (resized size rounded
up to 32), so the model sees exactly the official padding.
"""

from cn2_jax.data.augment import AugmentSettings
from cn2_jax.data.batcher import BATCH_KEYS, LSJ
from cn2_jax.data.loader import (
    DEFAULT_TRAIN_SHORT_SIZES,
    TrainLoaderSettings,
    default_pad_hw,
    eval_plan,
    make_eval_loader,
    make_train_loader,
    num_eval_batches,
    train_padding_overhead,
)
from cn2_jax.data.splits import (
    DetectionInfo,
    DetectionSplit,
    TrainPart,
    num_train_images,
    open_split,
)

__all__ = [
    "DetectionInfo",
    "DetectionSplit",
    "TrainPart",
    "LSJ",
    "AugmentSettings",
    "TrainLoaderSettings",
    "open_split",
    "make_train_loader",
    "make_eval_loader",
    "default_pad_hw",
    "num_eval_batches",
    "eval_plan",
    "train_padding_overhead",
    "num_train_images",
    "BATCH_KEYS",
    "DEFAULT_TRAIN_SHORT_SIZES",
]
