"""Dice and Dice + cross-entropy losses (mammojax/losses/dice.py) against MONAI's DiceLoss and
DiceCELoss, channels-last here, channels-first there."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mammojax.losses.dice import dice_ce_loss, dice_loss

torch = pytest.importorskip("torch")
monai = pytest.importorskip("monai")

TOLERANCE = 1e-5
SHAPES = {"2d": (2, 8, 8), "3d": (2, 8, 8, 8)}


def _channels_first(x: np.ndarray) -> "torch.Tensor":
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def _inputs(shape, num_classes, seed=0):
  """Logits ``[B, *S, K]`` float32 and integer labels ``[B, *S]``."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=shape + (num_classes,)).astype(np.float32) * 2
  labels = rng.integers(0, num_classes, size=shape)
  return logits, labels


def _max_diff(ours, theirs) -> float:
  return float(np.max(np.abs(np.asarray(ours) - theirs.detach().numpy().reshape(np.shape(ours)))))


def _max_relative_diff(ours, theirs) -> float:
  """For ``reduction="sum"`` over ~1000 voxels: the float32 spacing near the sum is above 1e-5."""
  theirs = theirs.detach().numpy().reshape(np.shape(ours))
  return float(np.max(np.abs(np.asarray(ours) - theirs) / np.maximum(1.0, np.abs(theirs))))


DICE_CASES = {
  "defaults_probabilities": dict(activation="probs", monai={}),
  "softmax_labels": dict(activation="logits", monai={"softmax": True}),
  "sigmoid_multilabel": dict(activation="logits", multilabel=True, monai={"sigmoid": True}),
  "no_background": dict(activation="logits", monai={"softmax": True, "include_background": False}),
  "squared_pred": dict(activation="logits", monai={"softmax": True, "squared_pred": True}),
  "jaccard": dict(activation="logits", monai={"softmax": True, "jaccard": True}),
  "batch": dict(activation="logits", monai={"softmax": True, "batch": True}),
  "reduction_none": dict(activation="logits", monai={"softmax": True, "reduction": "none"}),
  "reduction_none_batch": dict(
    activation="logits", monai={"softmax": True, "reduction": "none", "batch": True}
  ),
  "reduction_sum_weighted": dict(
    activation="logits",
    monai={"softmax": True, "reduction": "sum", "weight": [0.2, 1.0, 3.0]},
  ),
  "smoothing": dict(
    activation="logits", monai={"softmax": True, "smooth_nr": 0.0, "smooth_dr": 1e-3}
  ),
}


@pytest.mark.parametrize("dims", sorted(SHAPES))
@pytest.mark.parametrize("case", sorted(DICE_CASES))
def test_dice_loss_matches_monai(case, dims):
  spec = DICE_CASES[case]
  shape, num_classes = SHAPES[dims], 3
  logits, labels = _inputs(shape, num_classes, seed=len(case))
  options = dict(spec["monai"])
  pred = jax.nn.softmax(logits, -1) if spec["activation"] == "probs" else logits
  pred = np.asarray(pred)
  if spec.get("multilabel"):
    # Several classes may be on at once: a one-hot-shaped float target, to_onehot_y=False.
    target = (np.random.default_rng(1).random(shape + (num_classes,)) > 0.6).astype(np.float32)
    theirs = monai.losses.DiceLoss(**options)(_channels_first(pred), _channels_first(target))
  else:
    target = labels
    theirs = monai.losses.DiceLoss(to_onehot_y=True, **options)(
      _channels_first(pred), torch.from_numpy(labels[:, None])
    )
  ours = dice_loss(jnp.asarray(pred), jnp.asarray(target), **options)
  if options.get("reduction") == "none":
    expected_shape = (num_classes - (not options.get("include_background", True)),)
    assert ours.shape == (
      (expected_shape) if options.get("batch") else (shape[0],) + expected_shape
    )
  assert _max_diff(ours, theirs) <= TOLERANCE


def test_dice_loss_one_hot_target_equals_labels():
  logits, labels = _inputs(SHAPES["3d"], 4)
  onehot = np.eye(4, dtype=np.float32)[labels]
  a = dice_loss(logits, labels, softmax=True, reduction="none")
  b = dice_loss(logits, onehot, softmax=True, reduction="none")
  c = dice_loss(logits, labels[..., None], softmax=True, reduction="none")
  np.testing.assert_allclose(a, b, atol=1e-7)
  np.testing.assert_allclose(a, c, atol=1e-7)


def test_single_channel_matches_monai_and_warns_like_it():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 6, 6, 6, 1)).astype(np.float32)
  labels = rng.integers(0, 2, size=(2, 6, 6, 6))
  with pytest.warns(UserWarning, match="include_background=False"):
    ours = dice_loss(logits, labels, sigmoid=True, include_background=False)
  with pytest.warns(UserWarning, match="include_background=False"):
    theirs = monai.losses.DiceLoss(sigmoid=True, include_background=False)(
      _channels_first(logits), torch.from_numpy(labels[:, None])
    )
  assert _max_diff(ours, theirs) <= TOLERANCE
  np.testing.assert_allclose(ours, dice_loss(logits, labels, sigmoid=True), atol=1e-7)


DICE_CE_CASES = {
  "softmax_labels": dict(monai={"softmax": True}),
  "labels_no_background_weighted": dict(
    monai={"softmax": True, "include_background": False, "weight": [0.5, 2.0, 1.0]}
  ),
  "one_hot_soft_ce": dict(one_hot=True, monai={"softmax": True, "lambda_dice": 0.3}),
  "labels_weighted_sum": dict(
    monai={"softmax": True, "reduction": "sum", "weight": [1.0, 0.5, 2.0], "lambda_ce": 0.7}
  ),
  "batch_squared": dict(monai={"softmax": True, "batch": True, "squared_pred": True}),
  "sigmoid_binary": dict(classes=1, monai={"sigmoid": True}),
  "sigmoid_binary_pos_weight": dict(classes=1, monai={"sigmoid": True, "weight": [2.5]}),
}


@pytest.mark.parametrize("dims", sorted(SHAPES))
@pytest.mark.parametrize("case", sorted(DICE_CE_CASES))
def test_dice_ce_loss_matches_monai(case, dims):
  spec = DICE_CE_CASES[case]
  num_classes = spec.get("classes", 3)
  logits, labels = _inputs(SHAPES[dims], max(num_classes, 2), seed=len(case) + 7)
  logits = logits[..., :num_classes]
  options = dict(spec["monai"])
  monai_options = dict(options)
  if "weight" in options:
    monai_options["weight"] = torch.tensor(options["weight"])
  if spec.get("one_hot"):
    target = np.eye(num_classes, dtype=np.float32)[labels]
    theirs = monai.losses.DiceCELoss(**monai_options)(
      _channels_first(logits), _channels_first(target)
    )
  else:
    target = labels
    theirs = monai.losses.DiceCELoss(to_onehot_y=num_classes > 1, **monai_options)(
      _channels_first(logits), torch.from_numpy(labels[:, None])
    )
  ours = dice_ce_loss(jnp.asarray(logits), jnp.asarray(target), **options)
  if options.get("reduction") == "sum":
    assert _max_relative_diff(ours, theirs) <= TOLERANCE
  else:
    assert _max_diff(ours, theirs) <= TOLERANCE


@pytest.mark.parametrize("batch", [False, True])
def test_padded_examples_do_not_contribute(batch):
  logits, labels = _inputs(SHAPES["3d"], 3)
  padded_logits = np.concatenate([logits, np.full_like(logits[:1], 50.0)])
  padded_labels = np.concatenate([labels, np.zeros_like(labels[:1])])
  valid = jnp.array([1.0, 1.0, 0.0])
  for loss in (dice_loss, dice_ce_loss):
    kwargs = dict(softmax=True, batch=batch)
    expected = loss(logits, labels, **kwargs)
    got = loss(padded_logits, padded_labels, valid=valid, **kwargs)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(
      loss(padded_logits, padded_labels, valid=valid, reduction="sum", **kwargs),
      loss(logits, labels, reduction="sum", **kwargs),
      rtol=1e-6,
    )
    grad = jax.grad(lambda x: loss(x, padded_labels, valid=valid, **kwargs))(padded_logits)
    assert float(jnp.max(jnp.abs(grad[2]))) == 0.0
    assert float(jnp.max(jnp.abs(grad[:2]))) > 0.0
  none = dice_loss(padded_logits, padded_labels, softmax=True, reduction="none", valid=valid)
  assert none.shape == (3, 3) and float(jnp.max(jnp.abs(none[2]))) == 0.0
  # A batch of padding only: a zero loss, not NaN.
  empty = dice_ce_loss(padded_logits, padded_labels, softmax=True, valid=jnp.zeros(3))
  assert float(empty) == 0.0


def test_losses_jit_and_differentiate():
  logits, labels = _inputs(SHAPES["2d"], 3)
  loss = jax.jit(functools.partial(dice_ce_loss, softmax=True))
  value, grad = jax.value_and_grad(loss)(jnp.asarray(logits), jnp.asarray(labels))
  assert np.isfinite(float(value)) and grad.shape == logits.shape
  np.testing.assert_allclose(value, dice_ce_loss(logits, labels, softmax=True), rtol=1e-6)


def test_bad_inputs_raise_clear_errors():
  logits, labels = _inputs(SHAPES["2d"], 3)
  with pytest.raises(ValueError, match="sigmoid=True and softmax=True"):
    dice_loss(logits, labels, sigmoid=True, softmax=True)
  with pytest.raises(ValueError, match="target"):
    dice_loss(logits, labels[:, :4])
  with pytest.raises(ValueError, match="integer class indices"):
    dice_loss(logits, labels.astype(np.float32))
  with pytest.raises(ValueError, match="reduction"):
    dice_ce_loss(logits, labels, reduction="none")
  with pytest.raises(ValueError, match="valid"):
    dice_loss(logits, labels, valid=jnp.ones(3))
  with pytest.raises(ValueError, match="weight"):
    dice_loss(logits, labels, weight=[1.0, 2.0])
  with pytest.raises(ValueError, match=">= 0"):
    dice_loss(logits, labels, weight=[1.0, -2.0, 1.0])
