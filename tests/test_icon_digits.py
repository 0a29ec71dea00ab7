"""The ICON digits demo: data, training through the common trainer, report figure."""

import json
import os

import numpy as np
import pytest
from shipped_configs import shipped_config

from mammojax import tasks
from mammojax.data import digits
from mammojax.evaluate import evaluate_checkpoint
from mammojax.train.trainer import train_and_evaluate


def test_sklearn_pairs_are_smooth_upsampled_digits_of_one_class():
  spec = digits.DigitPairsSpec(source="sklearn", size=28, num_train=6, num_val=3, num_test=3)
  train = digits.digit_pairs(spec, "train")
  assert len(train) == 6
  example = train[0]
  assert set(example) == {"moving", "fixed"}
  assert example["moving"].shape == (28, 28, 1) and example["moving"].dtype == np.float32
  assert 0.0 <= example["moving"].min() and example["moving"].max() <= 1.0
  assert not np.array_equal(example["moving"], example["fixed"])
  # The digit sits inside a black margin, as MNIST's.
  assert example["moving"][:3].max() == 0.0 and example["moving"][:, -3:].max() == 0.0
  # Training pairs are 5s, evaluation pairs 7s: every image comes from its class's pool.
  images, labels = digits.sklearn_digit_images(28)
  fives = {images[i].tobytes() for i in np.flatnonzero(labels == 5)}
  sevens = {images[i].tobytes() for i in np.flatnonzero(labels == 7)}
  assert all(train[i]["moving"][..., 0].tobytes() in fives for i in range(6))
  val = digits.digit_pairs(spec, "val")
  assert all(val[i]["fixed"][..., 0].tobytes() in sevens for i in range(3))
  # Deterministic.
  np.testing.assert_array_equal(digits.digit_pairs(spec, "train")[3]["fixed"], train[3]["fixed"])


def test_mnist_without_local_copy_is_a_clear_error_and_auto_falls_back(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(digits.DigitsUnavailableError, match="not prepared"):
    digits.load_digit_images("mnist", tfds_data_dir=str(tmp_path))
  _, _, used = digits.load_digit_images("auto", size=16, tfds_data_dir=str(tmp_path))
  assert used == "sklearn"
  with pytest.raises(ValueError, match="source"):
    digits.load_digit_images("emnist")


def test_training_beats_identity_and_report_has_figure(tmp_path):
  config = shipped_config("icon_digits", "smoke")
  config.train.steps = config.eval.every_steps = config.checkpoint.every_steps = 40
  config.logging.every_steps = 20
  config.optim.learning_rate = 3e-3
  config.model.hidden = 16
  config.data.num_train = 64
  # A network this small does not generalise to another digit in 40 steps; evaluate on other
  # pairs of the training class (the default config evaluates on 7s).
  config.data.eval_digit = config.data.train_digit
  task = tasks.build_task(config)
  summary = train_and_evaluate(config, str(tmp_path), task, show_progress=False)
  assert summary["step"] == 40
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  final = [r for r in rows if "eval/similarity" in r][-1]
  assert final["eval/similarity_identity"] > 0
  assert final["eval/similarity"] < 0.8 * final["eval/similarity_identity"]

  out = tmp_path / "eval_test"
  result = evaluate_checkpoint(config, str(tmp_path), "best", "test", str(out))
  report = result["report"]
  assert report["similarity"] < report["similarity_identity"]
  assert report["figure"] == "registration.png"
  assert os.path.getsize(out / "registration.png") > 1000
