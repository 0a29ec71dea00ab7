"""``python -m mammojax.segment``: a trained run on NIfTI contrasts (the ingest's preprocessing,
outputs back on the input grid with its affine), a converted MONAI UNETR on a ``.npy`` against
MONAI's own sliding-window inference, and bad input."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from mammojax import segment, tasks
from mammojax.data.ingest import volume_csv
from mammojax.data.synthetic import brain_volumes
from mammojax.data.synthetic.image_files import write_nifti

INPUT_SPACING = (1.2, 1.0, 1.0)  # (z, y, x) mm: the ingest resamples to the record grid


def _write_subject(directory, contrasts, drop=()):
  """Raw contrasts of one synthetic subject as NIfTI files (``[X, Y, Z]`` on disk, so the
  ingest's reader gives back ``[D, H, W]``); returns the paths ('' for a dropped contrast) and the
  raw ``[D, H, W]`` arrays."""
  spec = brain_volumes.SyntheticVolumeSpec(size=(24, 28, 32))
  volume, present, _ = brain_volumes.raw_subject(spec, "test", 1)
  paths, arrays = [], []
  for name in contrasts:
    index = brain_volumes.CONTRASTS.index(name)
    if name in drop or not present[index]:
      paths.append("")
      arrays.append(None)
      continue
    path = os.path.join(directory, f"{name}.nii.gz")
    write_nifti(path, volume[..., index].transpose(2, 1, 0), spacing=INPUT_SPACING[::-1])
    paths.append(path)
    arrays.append(volume[..., index])
  return paths, arrays


def test_run_on_nifti_files_equals_the_task_on_the_ingested_volume(unetr_smoke_run, tmp_path):
  config, workdir, _, _ = unetr_smoke_run
  paths, arrays = _write_subject(str(tmp_path), config.data.contrasts)
  out = str(tmp_path / "out")
  summary = segment.run(
    [f"--workdir={workdir}", f"--images={','.join(paths)}", f"--out={out}", "--save_logits"]
  )
  nib = pytest.importorskip("nibabel")
  labels_file = nib.load(os.path.join(out, "labels.nii.gz"))
  reference = nib.load(next(p for p in paths if p))
  np.testing.assert_allclose(labels_file.affine, reference.affine)
  assert labels_file.shape == reference.shape
  # The same code path as the ingest: preprocess, the task's whole-volume logits, back to the
  # input grid.
  task = tasks.build_task(config)
  from mammojax.runs.restore import restore_run

  variables = restore_run(workdir, example_split="val").variables
  record, fit = volume_csv.preprocess_contrasts(
    arrays, INPUT_SPACING, tuple(config.data.synthetic.size)
  )
  expected = np.asarray(task.logits(variables, jnp.asarray(record, jnp.float32)[None])[0])
  expected = volume_csv.restore_to_grid(expected, fit, order=1)
  logits = np.load(os.path.join(out, "logits.npy"))
  assert logits.shape == arrays[0].shape + (config.model.num_classes,)
  np.testing.assert_allclose(logits, expected, atol=1e-4)
  labels = np.asarray(labels_file.dataobj).transpose(2, 1, 0)
  np.testing.assert_array_equal(labels, np.argmax(expected, axis=-1))
  assert summary["preprocessing"] == "volume ingest"
  assert sum(c["voxels"] for c in summary["classes"].values()) == labels.size
  text = open(os.path.join(out, "segment.json")).read()
  assert str(tmp_path) not in text and "nii.gz" in text  # no input path, only our file names
  assert os.path.exists(os.path.join(out, "figure.png"))


def test_restore_to_grid_inverts_the_ingest_geometry():
  rng = np.random.default_rng(0)
  labels = np.zeros((30, 40, 36))
  labels[8:20, 10:30, 9:27] = 1  # a box well inside a non-zero head
  head = np.zeros_like(labels)
  head[3:27, 4:36, 2:34] = rng.random((24, 32, 32)) + 0.5
  _, fit = volume_csv.preprocess_contrasts([head], (1.0, 1.0, 1.0), (32, 32, 32))
  on_records = volume_csv.fit_labels(labels, fit)
  back = volume_csv.restore_to_grid(on_records[..., None], fit, order=0)[..., 0]
  assert back.shape == labels.shape
  assert np.mean(back != labels) < 0.02  # nearest resampling there and back


def test_missing_optional_contrast_is_zeros_and_a_missing_required_one_is_refused(
  unetr_smoke_run, tmp_path
):
  config, workdir, _, _ = unetr_smoke_run
  paths, _ = _write_subject(str(tmp_path), config.data.contrasts, drop=("T2",))
  summary = segment.run(
    [f"--workdir={workdir}", f"--images={','.join(paths)}", f"--out={tmp_path}/o"]
  )
  assert summary["contrasts_given"] == ["TRACE", "ADC"]
  paths, _ = _write_subject(str(tmp_path), config.data.contrasts, drop=("ADC",))
  with pytest.raises(ValueError, match=r"required contrast\(s\) \['ADC'\] have no file"):
    segment.run([f"--workdir={workdir}", f"--images={','.join(paths)}", f"--out={tmp_path}/p"])
  with pytest.raises(ValueError, match="give 3 files, one per contrast"):
    segment.run([f"--workdir={workdir}", f"--images={paths[0]}", f"--out={tmp_path}/q"])
  assert not os.path.exists(tmp_path / "p") and not os.path.exists(tmp_path / "q")


def test_converted_monai_unetr_on_npy_matches_monai_sliding_window(tmp_path):
  torch = pytest.importorskip("torch")
  pytest.importorskip("monai")
  from monai.inferers import sliding_window_inference
  from monai.networks.nets import UNETR

  from mammojax.convert import __main__ as convert

  torch.manual_seed(0)
  net = UNETR(2, 3, (32, 32, 32), feature_size=4, hidden_size=24, mlp_dim=48, num_heads=2)
  with torch.no_grad():
    for p in net.parameters():
      p.add_(0.1 * torch.randn_like(p))
  net.eval()
  torch.save(net.state_dict(), tmp_path / "unetr.pt")
  converted = str(tmp_path / "converted")
  convert.run(["unetr", str(tmp_path / "unetr.pt"), f"--out={converted}", "--unetr_num_heads=2"])
  volume = np.random.default_rng(1).normal(size=(40, 48, 36, 2)).astype(np.float32)
  np.save(tmp_path / "volume.npy", volume)
  out = str(tmp_path / "out")
  summary = segment.run(
    [
      f"--model=unetr:{converted}",
      f"--images={tmp_path / 'volume.npy'}",
      f"--out={out}",
      "--save_logits",
      "--overlap=0.5",
      "--blend=gaussian",
    ]
  )
  with torch.no_grad():
    expected = sliding_window_inference(
      torch.from_numpy(volume.transpose(3, 0, 1, 2)[None]),
      (32, 32, 32),
      4,
      net,
      overlap=0.5,
      mode="gaussian",
    )
  expected = expected[0].numpy().transpose(1, 2, 3, 0)
  logits = np.load(os.path.join(out, "logits.npy"))
  scale = max(1.0, float(np.abs(expected).max()))
  np.testing.assert_allclose(logits, expected, atol=1e-4 * scale)
  np.testing.assert_array_equal(np.load(os.path.join(out, "labels.npy")), logits.argmax(-1))
  assert summary["preprocessing"].startswith("none") and summary["window"] == [32, 32, 32]
  assert json.load(open(os.path.join(out, "segment.json")))["classes"]["class_0"]["ml"] is None
  with pytest.raises(ValueError, match=r"takes \[D, H, W, 2\]"):
    np.save(tmp_path / "bad.npy", volume[..., :1])
    segment.run([f"--model=unetr:{converted}", f"--images={tmp_path / 'bad.npy'}", f"--out={out}2"])
