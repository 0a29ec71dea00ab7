"""Input speed: batches/s of the longitudinal Grain training pipeline with 0, 1, 2 workers.

  python benchmarks/pipeline.py --config=configs/imgfeatalign.py
  python benchmarks/pipeline.py --config=configs/imgfeatalign.py:smoke --batches=4 --repeats=3
  python benchmarks/pipeline.py --config=configs/imgfeatalign.py --augment  # + augmentations

Reads ``ImgFeatAlignTask(config).dataset('train')`` (the synthetic set or ``config.data.dir``)
through ``mammojax.data.pipelines.batching.train_iterator``, the trainer's own iterator, at
``config.train.batch_size`` for one process. Each timed sample pulls ``--batches`` batches; a case
is one worker count, measured alone (cases are not interleaved: an idle pipeline's workers keep
prefetching and would steal the CPU from the one being timed). ``startup_s`` is the time to the
first batch (worker start-up included). With ``--augment`` every worker count is also timed with
the host augmentations of ``mammojax.data.pipelines.augment`` (flip, affine, intensity
jitter). Compare ``batches_per_s`` with ``1000 / median_ms`` of ``benchmarks/train_step.py`` for
the same config: the pipeline keeps up when it is higher.
"""

from __future__ import annotations

import gc
import os
import sys
import time

if not __package__:  # Run as a script: make the repository root importable (benchmarks/).
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grain  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import harness  # noqa: E402
from mammojax.data.pipelines import (
  augment,  # noqa: E402
  batching,  # noqa: E402
)
from mammojax.tasks.imgfeatalign import ImgFeatAlignTask  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = config_flags.DEFINE_config_file(
  "config",
  os.path.join(_REPO, "configs", "imgfeatalign.py"),
  "A longitudinal (ImgFeatAlign) config file, optionally with a variant; override fields with "
  "--config.a.b=value.",
  lock_config=True,
)
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "Grain worker counts to time.")
_BATCHES = flags.DEFINE_integer("batches", 8, "Batches pulled per timed sample.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed samples per case.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed samples per case (after the first batch).")
_AUGMENT = flags.DEFINE_bool("augment", False, "Also time each worker count with augmentations.")


def time_pipeline(
  examples: grain.MapDataset,
  name: str,
  workers: int,
  seed: int,
  batch_size: int,
  batches: int,
  warmup: int,
  repeats: int,
) -> dict:
  """One case: ``train_iterator`` over ``examples`` with ``workers`` worker processes."""
  start = time.perf_counter()
  iterator = batching.train_iterator(
    examples,
    seed=seed,
    global_batch_size=batch_size,
    process_index=0,
    process_count=1,
    workers=workers,
  )
  next(iterator)
  startup_s = time.perf_counter() - start

  def pull() -> None:
    for _ in range(batches):
      next(iterator)  # noqa: F821 (bound above; the del below only ends the case)

  case = harness.Case(
    name=name,
    impl="grain",
    fn=pull,
    extra={
      "workers": workers,
      "batch_size": batch_size,
      "batches_per_sample": batches,
      "startup_s": startup_s,
    },
  )
  [row] = harness.time_cases([case], warmup=warmup, repeats=repeats)
  del iterator, case, pull  # frees the worker processes before the next case
  gc.collect()  # Stops this case's worker processes before the next case starts.
  row["batches_per_s"] = batches / (row["median_ms"] / 1e3)
  row["examples_per_s"] = row["batches_per_s"] * batch_size
  return row


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  examples = ImgFeatAlignTask(config).dataset("train")
  variants = {"": examples}
  if _AUGMENT.value:
    augmented = examples
    for transform in augment.train_augmentations(augment.AugmentConfig()):
      augmented = augmented.random_map(transform, seed=config.seed)
    variants["+augment"] = augmented
  results = []
  for suffix, dataset in variants.items():
    for workers in (int(w) for w in _WORKERS.value):
      results.append(
        time_pipeline(
          dataset,
          f"workers={workers}{suffix}",
          workers,
          config.seed,
          config.train.batch_size,
          _BATCHES.value,
          _WARMUP.value,
          _REPEATS.value,
        )
      )
  harness.report(
    "pipeline",
    results,
    config=config_flags.get_config_filename(flags.FLAGS["config"]),
    image_size=list(config.data.image_size),
    num_train=len(examples),
  )


if __name__ == "__main__":
  app.run(main)
