"""Attribution methods: parity with Captum 0.9.0 on converted torchvision models, exact gradient
SHAP on a linear model, layer names, and the perturb taps' inertness."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mammojax import interpret
from mammojax.convert.resnet import import_resnet
from mammojax.convert.vit import import_vit
from mammojax.interpret.interpolate import interpolate, nearest_indices
from mammojax.nn.resnet import ResNet
from mammojax.nn.vit import VisionTransformer

torch = pytest.importorskip("torch")
captum_attr = pytest.importorskip("captum.attr")
from captum.attr._utils.approximation_methods import approximation_parameters  # noqa: E402
from torch_refs.small_vit import small_torchvision_vit  # noqa: E402
from torch_refs.torchvision_import import import_torchvision  # noqa: E402

torchvision = import_torchvision()
pytestmark = pytest.mark.filterwarnings(  # Captum's notes on its own hooks
  "ignore:Input Tensor 0 did not already require gradients",
  "ignore:Setting backward hooks on ReLU activations",
)

SIZE = 48  # ResNet-18: layer3 3x3, layer4 2x2 (integer factors 16 and 24 to the input)
NUM_CLASSES = 5
TARGETS = np.array([1, 3])
RELATIVE = 1e-5  # max |ours - Captum| / max |Captum|


def _relative(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def _delta_error(ours, theirs, attributions) -> float:
  """Convergence delta error relative to each example's total |attribution| (the scale its
  sum, and so its delta, is rounded at)."""
  scale = np.abs(attributions.detach().numpy()).sum(axis=(1, 2, 3))
  return float(np.max(np.abs(np.asarray(ours) - theirs.detach().numpy()) / scale))


def _nchw(images: np.ndarray):
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def _nhwc(tensor) -> np.ndarray:
  return tensor.detach().numpy().transpose(0, 2, 3, 1)


def _images(size: int, seed: int, batch: int = 2) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def _random_variables(model: nn.Module, images: np.ndarray, seed: int, **kwargs):
  """Normal(0, 0.3) variables of ``model``'s shapes (no compiled initialiser: cheaper)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, **kwargs))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(s.dtype), shapes)


@pytest.fixture(scope="module")
def resnet():
  """(torch ResNet-18, our adapter, images): random weights, BN statistics measured on a batch
  (so that eval-mode activations keep their scale) then perturbed."""
  torch.manual_seed(0)
  model = torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES)
  generator = torch.Generator().manual_seed(0)
  norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    model.fc.bias.normal_(0.0, 0.5, generator=generator)
    for m in norms:
      m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=generator))
      m.bias.copy_(0.2 * torch.randn(m.num_features, generator=generator))
      m.momentum = None
    model.train()
    model(torch.randn(8, 3, SIZE, SIZE, generator=generator))
    for m in norms:
      m.running_var.mul_(0.8 + 0.4 * torch.rand(m.num_features, generator=generator))
  model.eval()
  variables, fields, _ = import_resnet({k: v.numpy() for k, v in model.state_dict().items()})
  adapter = interpret.resnet_adapter(ResNet(**fields), variables)
  return model, adapter, _images(SIZE, seed=1)


@pytest.fixture(scope="module")
def vit():
  """(torch ViT with a tokens -> grid -> tokens detour after block 0, our adapter, images)."""
  model = small_torchvision_vit(num_classes=NUM_CLASSES)
  variables, fields, _ = import_vit({k: v.numpy() for k, v in model.state_dict().items()}, 4)
  adapter = interpret.vit_adapter(VisionTransformer(**fields), variables)

  class ToGrid(torch.nn.Module):
    """Tokens [B, 1 + N, D] -> patch grid [B, D, h, w]; the class token goes around."""

    def forward(self, tokens):
      self.class_token = tokens[:, :1]
      patches = tokens[:, 1:]
      return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], 4, 4)

  class FromGrid(torch.nn.Module):
    def __init__(self, to_grid):
      super().__init__()
      self.to_grid = [to_grid]  # a plain list: not a submodule

    def forward(self, grid):
      tokens = grid.flatten(2).transpose(1, 2)
      return torch.cat([self.to_grid[0].class_token, tokens], dim=1)

  to_grid = ToGrid()
  block = model.encoder.layers.encoder_layer_0
  model.encoder.layers.encoder_layer_0 = torch.nn.Sequential(block, to_grid, FromGrid(to_grid))
  model.to_grid = to_grid
  return model, adapter, _images(32, seed=2)


def _captum_layer_gradcam(model, layer, images, relu=False):
  cam = captum_attr.LayerGradCam(model, layer).attribute(
    _nchw(images), target=torch.from_numpy(TARGETS), relu_attributions=relu
  )
  return cam  # [B, 1, h, w]


@pytest.mark.parametrize("layer", ["layer3", "layer4"])
def test_resnet_gradcam_matches_captum(resnet, layer):
  model, adapter, images = resnet
  for relu in (False, True):
    theirs = _captum_layer_gradcam(model, getattr(model, layer), images, relu=relu)
    ours = interpret.gradcam(adapter, images, TARGETS, layer, relu=relu, upsample=None)
    error = _relative(ours, theirs[:, 0].detach().numpy())
    print(f"GradCAM {layer} relu={relu}: relative error {error:.1e}")
    assert error <= RELATIVE
    assert (np.asarray(ours) < 0).any() != relu  # signed by default, as Captum
  for mode in ("nearest", "bilinear"):
    upsampled = captum_attr.LayerAttribution.interpolate(theirs, (SIZE, SIZE), mode)
    ours = interpret.gradcam(adapter, images, TARGETS, layer, relu=True, upsample=mode)
    assert ours.shape == (2, SIZE, SIZE)
    error = _relative(ours, upsampled[:, 0].detach().numpy())
    print(f"GradCAM {layer} relu upsampled {mode}: relative error {error:.1e}")
    assert error <= RELATIVE
  per_channel = interpret.gradcam(
    adapter, images, TARGETS, layer, upsample=None, attr_dim_summation=False
  )
  theirs = captum_attr.LayerGradCam(model, getattr(model, layer)).attribute(
    _nchw(images), target=torch.from_numpy(TARGETS), attr_dim_summation=False
  )
  assert _relative(per_channel, _nhwc(theirs)) <= RELATIVE


def test_guided_backprop_and_guided_gradcam_match_captum(resnet):
  model, adapter, images = resnet
  theirs = captum_attr.GuidedBackprop(model).attribute(
    _nchw(images), target=torch.from_numpy(TARGETS)
  )
  guided = interpret.guided_backprop(adapter, images, TARGETS)
  assert guided.rectified
  error = _relative(guided.attributions, _nhwc(theirs))
  print(f"GuidedBackprop: relative error {error:.1e}")
  assert error <= RELATIVE
  plain = captum_attr.Saliency(model).attribute(
    _nchw(images), target=torch.from_numpy(TARGETS), abs=False
  )
  assert _relative(guided.attributions, _nhwc(plain)) > 1e-2  # the rectification matters
  theirs = captum_attr.GuidedGradCam(model, model.layer4).attribute(
    _nchw(images), target=torch.from_numpy(TARGETS)
  )
  ours = interpret.guided_gradcam(adapter, images, TARGETS, "layer4")
  error = _relative(ours.attributions, _nhwc(theirs))
  print(f"GuidedGradCam layer4: relative error {error:.1e}")
  assert error <= RELATIVE


@pytest.fixture(scope="module")
def resnet64(resnet):
  """The same ResNet-18 in float64 (torch and ours; call ours under ``jax.enable_x64``), on
  smaller images.

  Path methods evaluate the network at many points; in float32 a few of them land within
  rounding of a ReLU's kink, where torch and XLA then take different sides (measured: 4 of
  IG's 100 points, gradients 1-3 % apart there, 5e-4 on the attributions). In float64 neither
  side is that close, so the comparison tests the method, not the rounding.
  """
  model, adapter, _ = resnet
  model64 = copy.deepcopy(model).double()
  variables = jax.tree.map(lambda a: np.asarray(a, np.float64), adapter.variables)
  adapter64 = interpret.resnet_adapter(adapter.module.clone(dtype=jnp.float64), variables)
  return model64, adapter64, _images(16, seed=8).astype(np.float64)


def test_integrated_gradients_match_captum(resnet64):
  """Gauss-Legendre, 50 steps, zero baseline (Captum's defaults) on the CNN."""
  model, adapter, images = resnet64
  theirs, delta = captum_attr.IntegratedGradients(model).attribute(
    _nchw(images), target=torch.from_numpy(TARGETS), n_steps=50, return_convergence_delta=True
  )
  # Chunks of 10 steps x 2 examples: the scan never holds the 100 gradients at once.
  with jax.enable_x64(True):
    ours = interpret.integrated_gradients(adapter, images, TARGETS, internal_batch_size=20)
    assert ours.attributions.dtype == jnp.float64
  error = _relative(ours.attributions, _nhwc(theirs))
  delta_error = _delta_error(ours.delta, delta, theirs)
  print(f"IG gausslegendre: relative error {error:.1e}, delta error {delta_error:.1e}")
  assert error <= RELATIVE
  assert delta_error <= RELATIVE


@pytest.mark.parametrize("method", interpret.integrated.METHODS)
def test_quadrature_is_captums(method):
  step_sizes, alphas = approximation_parameters(method)
  ours_alphas, ours_steps = interpret.quadrature(method, 7)
  np.testing.assert_allclose(ours_alphas, alphas(7), rtol=0, atol=1e-7)
  np.testing.assert_allclose(ours_steps, step_sizes(7), rtol=0, atol=1e-7)


def test_gradient_shap_replays_captum_draws(resnet64):
  """Captum's draws (numpy: baseline choice, then alphas), fed to our computation."""
  model, adapter, images = resnet64
  baselines = 0.3 * _images(16, seed=3, batch=3).astype(np.float64)
  n_samples, batch = 4, images.shape[0]
  np.random.seed(7)
  theirs = captum_attr.GradientShap(model).attribute(
    _nchw(images), _nchw(baselines), n_samples=n_samples, target=torch.from_numpy(TARGETS)
  )
  np.random.seed(7)
  # Captum repeats each example n_samples times (contiguous): row i * n + k.
  index = np.random.choice(3, n_samples * batch).reshape(batch, n_samples).T
  alpha = np.random.uniform(0.0, 1.0, batch * n_samples).reshape(batch, n_samples).T
  with jax.enable_x64(True):
    ours = interpret.gradient_shap_from_draws(
      adapter, images, TARGETS, baselines, index, None, alpha, internal_batch_size=2 * batch
    )
  error = _relative(ours, _nhwc(theirs))
  print(f"GradientShap (Captum's draws): relative error {error:.1e}")
  assert error <= RELATIVE


class _Linear(nn.Module):
  """A Dense layer on the flattened image: ``[B, H, W, C] -> [B, K]``, linear in the input."""

  @nn.compact
  def __call__(self, images):
    return nn.Dense(NUM_CLASSES)(images.reshape(images.shape[0], -1))


@pytest.fixture(scope="module")
def linear():
  images = _images(6, seed=4)
  model = _Linear()
  variables = _random_variables(model, images, seed=4)
  weights = np.asarray(variables["params"]["Dense_0"]["kernel"])  # [H * W * C, K]
  return interpret.module_adapter(model, variables), images, weights


def test_gradient_shap_exact_on_a_linear_model(linear):
  adapter, images, weights = linear
  columns = weights[:, TARGETS].T.reshape(images.shape)  # d logit[target] / d images
  baseline = np.full((4, *images.shape[1:]), 0.5, np.float32)  # one baseline, 4 times
  key = jax.random.key(3)
  single = interpret.gradient_shap(
    adapter, images, TARGETS, baseline, key=key, n_samples=7, internal_batch_size=4
  )
  np.testing.assert_allclose(single, (images - 0.5) * columns, rtol=1e-5, atol=1e-6)
  baselines = _images(6, seed=5, batch=4)
  noisy = interpret.gradient_shap(
    adapter, images, TARGETS, baselines, key=key, n_samples=7, stdevs=0.3, internal_batch_size=4
  )
  index, noise, alpha = map(np.asarray, interpret.gradient_shap_draws(key, images, 4, 7, 0.3))
  expected = np.mean(images[None] + noise - baselines[index], axis=0) * columns
  np.testing.assert_allclose(noisy, expected, rtol=1e-5, atol=1e-6)
  assert index.shape == alpha.shape == (7, 2) and 0 <= alpha.min() and alpha.max() <= 1
  assert len(np.unique(index)) > 1 and 0.2 < noise.std() < 0.4


def test_noise_tunnel_statistics_on_a_linear_model(linear):
  adapter, images, weights = linear
  columns = weights[:, TARGETS].T.reshape(images.shape)
  kwargs = dict(key=jax.random.key(5), nt_samples=2000, stdevs=0.5, nt_samples_batch_size=600)
  smooth = interpret.noise_tunnel(interpret.input_x_gradient, adapter, images, TARGETS, **kwargs)
  np.testing.assert_allclose(smooth, images * columns, atol=0.05 * np.abs(columns).max())
  var = interpret.noise_tunnel(
    interpret.input_x_gradient, adapter, images, TARGETS, nt_type="vargrad", **kwargs
  )
  np.testing.assert_allclose(var, 0.25 * columns**2, rtol=0.2, atol=1e-3 * np.max(columns**2))
  squared = interpret.noise_tunnel(
    interpret.saliency, adapter, images, TARGETS, nt_type="smoothgrad_sq", **kwargs
  )
  np.testing.assert_allclose(squared, columns**2, rtol=1e-5)  # the gradient ignores the noise


def test_vit_gradcam_on_token_grid_matches_captum(vit):
  model, adapter, images = vit
  theirs = _captum_layer_gradcam(model, model.to_grid, images)
  ours = interpret.gradcam(adapter, images, TARGETS, "encoder_layer_0_out", upsample=None)
  assert ours.shape == (2, 4, 4)
  error = _relative(ours, theirs[:, 0].detach().numpy())
  print(f"ViT GradCAM encoder_layer_0_out: relative error {error:.1e}")
  assert error <= RELATIVE
  upsampled = interpret.gradcam(adapter, images, TARGETS, "encoder_layer_0_out")
  assert upsampled.shape == (2, 32, 32)
  expected = captum_attr.LayerAttribution.interpolate(theirs, (32, 32))
  assert _relative(upsampled, expected[:, 0].detach().numpy()) <= RELATIVE
  theirs = _captum_layer_gradcam(model, model.conv_proj, images, relu=True)
  ours = interpret.gradcam(adapter, images, TARGETS, "conv_proj_out", relu=True, upsample=None)
  assert _relative(ours, theirs[:, 0].detach().numpy()) <= RELATIVE
  with pytest.warns(UserWarning, match="never reach the class token"):
    last = interpret.gradcam(adapter, images, TARGETS, "encoder_layer_1_out")
  assert not np.any(np.asarray(last))


def test_vit_guided_backprop_is_the_plain_gradient_and_saliency(vit):
  model, adapter, images = vit
  theirs = captum_attr.GuidedBackprop(model).attribute(
    _nchw(images), target=torch.from_numpy(TARGETS)
  )
  guided = interpret.guided_backprop(adapter, images, TARGETS)
  assert not guided.rectified  # GELU: nothing to rectify, in Captum as here
  assert _relative(guided.attributions, _nhwc(theirs)) <= RELATIVE
  # Saliency and input x gradient share that compiled gradient.
  targets = torch.from_numpy(TARGETS)
  theirs = captum_attr.Saliency(model).attribute(_nchw(images), target=targets)
  assert _relative(interpret.saliency(adapter, images, TARGETS), _nhwc(theirs)) <= RELATIVE
  theirs = captum_attr.InputXGradient(model).attribute(_nchw(images), target=targets)
  ours = interpret.input_x_gradient(adapter, images, TARGETS)
  assert _relative(ours, _nhwc(theirs)) <= RELATIVE


def test_vit_integrated_gradients_riemann_match_captum(vit):
  """A Riemann rule, on the ViT: smooth (GELU), so float32 points compare well."""
  model, adapter, images = vit
  theirs, delta = captum_attr.IntegratedGradients(model).attribute(
    _nchw(images),
    target=torch.from_numpy(TARGETS),
    n_steps=20,
    method="riemann_trapezoid",
    return_convergence_delta=True,
  )
  ours = interpret.integrated_gradients(
    adapter, images, TARGETS, n_steps=20, method="riemann_trapezoid", internal_batch_size=8
  )
  error = _relative(ours.attributions, _nhwc(theirs))
  delta_error = _delta_error(ours.delta, delta, theirs)
  print(f"ViT IG riemann_trapezoid: relative error {error:.1e}, delta error {delta_error:.1e}")
  assert error <= RELATIVE
  assert delta_error <= RELATIVE


def test_wrong_layer_lists_available_layers(resnet, vit):
  _, adapter, images = resnet
  names = interpret.layer_names(adapter, images)
  assert names == ("relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")
  with pytest.raises(ValueError, match="available layers: relu, maxpool, layer1, .*avgpool"):
    interpret.gradcam(adapter, images, 1, "layer5")
  _, vit_adapter, vit_images = vit
  with pytest.raises(ValueError, match="conv_proj_out, encoder_layer_0_out"):
    interpret.gradcam(vit_adapter, vit_images, 1, "encoder_layer_0")
  with pytest.raises(ValueError, match="upsample=None"):
    interpret.gradcam(adapter, images, 1, "avgpool")
  with pytest.raises(ValueError, match="target must be"):
    interpret.gradcam(adapter, images, np.array([1, 2, 3]), "layer4")


def test_nested_layers_and_perturb_taps_are_inert():
  """A backbone inside another module is found by its bare name; init keeps no perturbations,
  and a call without them computes what it did before the taps."""

  class Classifier(nn.Module):
    @nn.compact
    def __call__(self, images):
      backbone = VisionTransformer(
        image_size=16, patch_size=8, hidden_dim=8, depth=1, num_heads=2, mlp_dim=8, name="vit"
      )
      return nn.Dense(3)(backbone(images))

  images = _images(16, seed=6)
  model = Classifier()
  variables = _random_variables(model, images, seed=6)
  assert set(variables) == {"params"}
  resnet = ResNet(depth=18, base_width=4)
  init = jax.eval_shape(lambda: resnet.init(jax.random.key(0), images, use_running_average=True))
  assert set(init) == {"params", "batch_stats"}
  adapter = interpret.module_adapter(model, variables, patch_size=8, class_token=True)
  names = ("vit/conv_proj_out", "vit/encoder_layer_0_out", "vit/encoder_norm_out")
  assert interpret.layer_names(adapter, images) == names
  capture = jax.jit(interpret.layer_activation_and_gradient, static_argnames="layer")
  with pytest.raises(ValueError, match="target class is needed"):
    capture(adapter, images, None, layer="encoder_norm_out")
  tokens, gradient = capture(adapter, images, jnp.array([0, 2]), layer="encoder_norm_out")
  assert tokens.shape == gradient.shape == (2, 2, 2, 8)  # the patch grid, class token dropped
  assert not np.any(np.asarray(gradient))  # patch tokens of the last output: no gradient
  plain, state = jax.jit(lambda v: model.apply(v, images, mutable=["intermediates"]))(variables)
  assert set(state) == {"intermediates"}
  sown = state["intermediates"]["vit"]["encoder_norm_out"][0]
  np.testing.assert_array_equal(tokens, sown[:, 1:].reshape(2, 2, 2, 8))
  _, shapes = jax.eval_shape(lambda x: model.apply(variables, x, mutable=["perturbations"]), images)
  perturbations = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["perturbations"])
  apply = jax.jit(lambda p: model.apply({**variables, "perturbations": p}, images))
  np.testing.assert_allclose(apply(perturbations), plain, rtol=1e-6, atol=1e-6)  # adds zeros
  shift = jnp.zeros((2, 5, 8)).at[:, 0].set(1.0)  # the class token of the final tokens
  perturbations["vit"]["encoder_norm_out"] = shift
  shifted = apply(perturbations)
  kernel = variables["params"]["Dense_0"]["kernel"]  # [8, 3]
  np.testing.assert_allclose(shifted - plain, jnp.ones((2, 8)) @ kernel, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sizes", [(3, 48), (14, 46), (4, 8), (10, 3)])
def test_interpolate_matches_torch(sizes):
  source, target = sizes
  maps = np.random.default_rng(0).normal(size=(2, source, source + 1)).astype(np.float32)
  shape = (target, target + 2)
  functional = torch.nn.functional
  for mode in ("nearest", "bilinear"):
    theirs = functional.interpolate(torch.from_numpy(maps)[:, None], shape, mode=mode)[:, 0]
    ours = interpolate(jnp.asarray(maps), shape, mode)
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=0, atol=1e-6)
  if sizes == (14, 46):  # torch's float32 index rule, not the exact floor(i * n / m)
    assert np.any(nearest_indices(14, 46) != np.arange(46) * 14 // 46)
  with pytest.raises(ValueError, match="interpolation mode"):
    interpolate(jnp.asarray(maps), shape, "bicubic")
