"""Attribution through Temporal-GradCam's trained models: the image classifier (backbone + head on
pipeline images) and the end-to-end sequence classifier, whose every visit image gets a map for
the sequence's prediction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mammojax import interpret
from mammojax.interpret import temporal as interpret_temporal
from mammojax.models.sequence_classifier import ImageClassifier, SequenceClassifier
from mammojax.nn.resnet import ResNet

RESNET = {"kind": "resnet", "depth": 18, "base_width": 4}
VIT = {
  "kind": "vit",
  "patch_size": 4,
  "hidden_dim": 16,
  "depth": 2,
  "num_heads": 2,
  "mlp_dim": 32,
  "image_size": 16,
}
GRU = {"kind": "gru", "hidden_dim": 8, "time_dim": 4}


def _randomized(variables, seed=0):
  """Variables with every parameter moved by noise (a fresh init has a zero classifier head:
  no gradient); the BatchNorm statistics stay as they are."""
  leaves, tree = jax.tree.flatten(variables["params"])
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  moved = [leaf + 0.1 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
  return {**variables, "params": jax.tree.unflatten(tree, moved)}


@pytest.fixture(scope="module")
def classifier():
  model = ImageClassifier(backbone=RESNET, num_classes=3)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 1))
  variables = _randomized(model.init(jax.random.key(0), images))
  return model, variables, images


def test_classifier_gradcam_equals_the_plain_resnet_on_the_same_weights(classifier):
  """The classifier's backbone + head is a torchvision-layout ResNet whose ``fc`` is the head,
  fed the grey image repeated to 3 channels: the same maps at ``layer4``."""
  model, variables, images = classifier
  adapter = interpret.classifier_adapter(model, variables)
  resnet = ResNet(depth=18, base_width=4, num_classes=3)
  params = dict(variables["params"]["backbone"], fc=variables["params"]["head"])
  plain = interpret.resnet_adapter(
    resnet, {"params": params, "batch_stats": variables["batch_stats"]["backbone"]}
  )
  rgb = jnp.repeat(images, 3, axis=-1)
  np.testing.assert_allclose(adapter.forward(images), plain.forward(rgb), atol=1e-5)
  target = jnp.array([0, 2])
  ours = interpret.gradcam(adapter, images, target, "layer4")
  reference = interpret.gradcam(plain, rgb, target, "layer4")
  assert ours.shape == (2, 32, 32)
  np.testing.assert_allclose(ours, reference, atol=1e-5 * float(jnp.abs(reference).max()))
  guided = interpret.guided_backprop(adapter, images, target)
  assert guided.rectified and guided.attributions.shape == (2, 32, 32, 1)
  # The grey pixel feeds all three channels: its gradient is their sum.
  plain_guided = interpret.guided_backprop(plain, rgb, target).attributions
  np.testing.assert_allclose(guided.attributions[..., 0], plain_guided.sum(-1), atol=1e-5)


def test_classifier_with_a_resizing_vit_maps_its_token_grid():
  """A ViT backbone that resizes 24x24 inputs to 16x16 has a 4x4 token grid; the map comes back
  at the input's 24x24."""
  model = ImageClassifier(backbone=dict(VIT, input_size=16), num_classes=2)
  images = jax.random.normal(jax.random.key(2), (2, 24, 24, 1))
  variables = _randomized(model.init(jax.random.key(0), images))
  adapter = interpret.classifier_adapter(model, variables)
  cam = interpret.gradcam(adapter, images, 1, "encoder_layer_0_out")
  assert cam.shape == (2, 24, 24)
  assert float(jnp.abs(cam).max()) > 0
  assert not interpret.guided_backprop(adapter, images, 1).rectified


@pytest.fixture(scope="module")
def sequence():
  model = SequenceClassifier(backbone=RESNET, temporal=GRU, num_classes=2)
  images = jax.random.normal(jax.random.key(3), (1, 3, 16, 16, 1))
  mask = jnp.array([[1.0, 1.0, 0.0]])  # end padding: the last position is empty
  images = images * mask[..., None, None, None]
  offsets = jnp.array([[2.0, 0.0, 0.0]])
  variables = _randomized(model.init(jax.random.key(0), images, mask, offsets))
  return model, variables, images, mask, offsets


def test_visit_rows_add_up_to_the_sequence_logit(sequence):
  model, variables, images, mask, offsets = sequence
  adapter = interpret_temporal.visit_image_adapter(model, variables, mask[0], offsets[0])
  logits = model.apply(variables, images, mask, offsets)
  rows = adapter.forward(images[0])
  assert rows.shape == (3, 2)
  np.testing.assert_allclose(rows.sum(0), logits[0], rtol=1e-5, atol=1e-6)


def test_visit_gradient_is_the_sequence_gradient_per_image(sequence):
  model, variables, images, mask, offsets = sequence
  adapter = interpret_temporal.visit_image_adapter(model, variables, mask[0], offsets[0])
  ours = interpret.input_gradient(adapter, images[0], 1)
  direct = jax.grad(lambda x: model.apply(variables, x, mask, offsets)[0, 1])(images)[0]
  np.testing.assert_allclose(ours, direct, atol=1e-6)
  assert float(jnp.abs(ours[2]).max()) == 0.0  # the padded visit
  cams = interpret.gradcam(adapter, images[0], 1, "layer3")
  assert cams.shape == (3, 16, 16) and float(jnp.abs(cams[2]).max()) == 0.0


def test_visit_integrated_gradients_over_pixels_are_complete(sequence):
  """Summed over every visit's pixels, integrated gradients give the sequence logit's change
  from the all-zero sequence (the interpolation point is shared by a sequence's visits)."""
  model, variables, images, mask, offsets = sequence
  adapter = interpret_temporal.visit_image_adapter(model, variables, mask[0], offsets[0])
  result = interpret.integrated_gradients(adapter, images[0], 1, n_steps=64)
  change = (
    model.apply(variables, images, mask, offsets)[0, 1]
    - model.apply(variables, jnp.zeros_like(images), mask, offsets)[0, 1]
  )
  np.testing.assert_allclose(float(result.attributions.sum()), float(change), rtol=2e-2, atol=2e-3)


def test_sequence_parts_compose_to_the_model(sequence):
  model, variables, images, mask, offsets = sequence
  features, apply_fn = interpret_temporal.sequence_parts(model, variables)
  feats = features(images, mask)
  assert feats.shape == (1, 3, 32) and float(jnp.abs(feats[0, 2]).max()) == 0.0
  np.testing.assert_allclose(
    apply_fn(feats, mask, offsets), model.apply(variables, images, mask, offsets), atol=1e-5
  )
  visits = interpret.visit_integrated_gradients(apply_fn, feats, mask, offsets, 1)
  assert visits.per_visit.shape == (1, 3) and float(visits.per_visit[0, 2]) == 0.0
  assert abs(float(visits.delta[0])) < 1e-4
