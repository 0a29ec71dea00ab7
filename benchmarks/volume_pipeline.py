"""Host throughput of the 3-D volume pipeline: crops/s from encoded volume records.

  python -m benchmarks.volume_pipeline                 # 96^3 x 7 -> 64^3 and 32^3 x 7 -> 24^3
  python -m benchmarks.volume_pipeline --small         # tiny sizes, seconds
  python -m benchmarks.volume_pipeline --cases 128x128x128:96x96x96

Records are synthetic brain volumes (``mammojax.data.synthetic.brain_volumes``, all seven
contrasts) of each case's volume size, encoded as stored. Per case:

- ``decode+augment``: ``volume_example`` on the record bytes, then the training transforms of
  ``mammojax.data.pipelines.volume.train_transforms`` (pos/neg crop, flips, in-plane quarter
  turns, intensity scale and shift), one example at a time in this process;
- ``augment``: the transforms alone on decoded examples (what is left once decoding is cached);
- ``train_iterator``: the trainer's Grain iterator (shuffle, transforms, batching) with
  ``--workers`` worker processes, ``--batch`` crops per batch.

``crops_per_s`` is crops per second of one process (for the iterator, of its workers together);
compare it with the train step's examples/s (benchmarks/train_step.py) for the same crop size.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

if not __package__:  # Run as a script: make the repository root importable (benchmarks/).
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grain  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402
from mammojax.data import records  # noqa: E402
from mammojax.data.pipelines import batching  # noqa: E402
from mammojax.data.pipelines import volume as volume_pipeline  # noqa: E402
from mammojax.data.synthetic import brain_volumes  # noqa: E402

FULL_CASES = (((96, 96, 96), (64, 64, 64)), ((32, 32, 32), (24, 24, 24)))
SMALL_CASES = (((24, 24, 24), (16, 16, 16)), ((16, 16, 16), (8, 8, 8)))


def _parse_cases(text: str) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
  cases = []
  for item in text.split(","):
    volume, _, crop = item.partition(":")
    sizes = tuple(tuple(int(v) for v in part.lower().split("x")) for part in (volume, crop))
    if any(len(s) != 3 for s in sizes):
      raise argparse.ArgumentTypeError(f"case {item!r} must be DxHxW:dxhxw, e.g. 96x96x96:64x64x64")
    cases.append(sizes)
  return tuple(cases)


def encoded_records(size: tuple[int, int, int], count: int) -> list[bytes]:
  """``count`` synthetic subjects of ``size`` voxels with all seven contrasts, encoded."""
  spec = brain_volumes.SyntheticVolumeSpec(size=size, missing_probability=0.0, num_train=count)
  return [
    records.encode_example(brain_volumes.generate_example(spec, "train", i)) for i in range(count)
  ]


def time_case(
  size: tuple[int, int, int],
  crop: tuple[int, int, int],
  args: argparse.Namespace,
) -> list[dict]:
  """The three timings of one (volume size, crop size) case."""
  encoded = encoded_records(size, args.records)
  decoded = [volume_pipeline.volume_example(r) for r in encoded]
  transforms = volume_pipeline.train_transforms(crop)
  name = f"{'x'.join(map(str, size))}x7->{'x'.join(map(str, crop))}"
  state = {"step": 0}

  def augment(example: dict) -> dict:
    rng = np.random.default_rng([args.seed, state["step"]])
    state["step"] += 1
    for transform in transforms:
      example = transform.random_map(example, rng)
    return example

  def decode_and_augment() -> None:
    for i in range(args.crops):
      augment(volume_pipeline.volume_example(encoded[i % len(encoded)]))

  def augment_only() -> None:
    for i in range(args.crops):
      augment(decoded[i % len(decoded)])

  live = {}  # the iterator, dropped after the case so its worker processes stop
  live["iterator"] = batching.train_iterator(
    grain.MapDataset.source(encoded).map(volume_pipeline.volume_example),
    seed=args.seed,
    global_batch_size=args.batch,
    process_index=0,
    process_count=1,
    workers=args.workers,
    augmentations=transforms,
  )
  batches = max(1, args.iterator_crops // args.batch)

  def pull() -> None:
    for _ in range(batches):
      next(live["iterator"])

  extra = {"volume_size": list(size), "crop_size": list(crop), "contrasts": 7}
  cases = [
    harness.Case(name, "decode+augment", decode_and_augment, extra=dict(extra, crops=args.crops)),
    harness.Case(name, "augment", augment_only, extra=dict(extra, crops=args.crops)),
    harness.Case(
      name,
      "train_iterator",
      pull,
      extra=dict(extra, crops=batches * args.batch, workers=args.workers, batch=args.batch),
    ),
  ]
  # One case at a time, not interleaved: the idle iterator's threads would keep prefetching
  # into the other cases' time (and fill its buffer, flattering its own samples).
  rows = [row for case in cases for row in harness.time_cases([case], args.warmup, args.repeats)]
  live.clear()
  gc.collect()
  for row in rows:
    row["crops_per_s"] = row["crops"] / (row["median_ms"] / 1e3)
    row["ms_per_crop"] = row["median_ms"] / row["crops"]
  return rows


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="tiny volumes (a smoke run)")
  parser.add_argument("--cases", type=_parse_cases, help="DxHxW:dxhxw[,...] volume:crop sizes")
  parser.add_argument("--records", type=int, default=4, help="distinct subjects per case")
  parser.add_argument("--crops", type=int, default=8, help="crops per timed sample")
  parser.add_argument(
    "--iterator_crops",
    type=int,
    default=32,
    help="crops per timed sample of train_iterator (well beyond its prefetch buffer)",
  )
  parser.add_argument("--batch", type=int, default=2, help="train_iterator batch size")
  parser.add_argument("--workers", type=int, default=0, help="train_iterator worker processes")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--seed", type=int, default=0)
  harness.add_host_memory_flag(parser)
  args = parser.parse_args(argv)
  # As the trainer: each crop allocates fresh multi-MB arrays, which glibc would otherwise map
  # and page-fault in anew every time.
  harness.setup_host_memory(args.release_host_memory)
  cases = args.cases or (SMALL_CASES if args.small else FULL_CASES)
  results = [row for size, crop in cases for row in time_case(size, crop, args)]
  load = os.getloadavg() if hasattr(os, "getloadavg") else None
  harness.report("volume_pipeline", results, small=args.small, load_average=load)


if __name__ == "__main__":
  main()
