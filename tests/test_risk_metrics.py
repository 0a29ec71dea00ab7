"""Risk metrics: hand-computed cases, brute-force agreement, bootstrap, subgroups, report files."""

import json
from fractions import Fraction

import numpy as np
import pytest

from mammojax.data.constants import NO_CANCER_YEARS as NO_CANCER
from mammojax.data.survival import survival_targets
from mammojax.metrics import bootstrap, calibration, risk, risk_report

# ---------------------------------------------------------------------------------------------
# Independent slow implementations written from the definitions.


def brute_event_times(ytc, ytf, num_years):
  time, event = [], []
  for cancer, followup in zip(ytc, ytf):
    if cancer < num_years:
      time.append(int(cancer))
      event.append(True)
    else:
      time.append(int(min(int(followup), num_years)) - 1)
      event.append(False)
  return time, event


def brute_km(time, event, num_years):
  survival, value = [], 1.0
  for t in range(num_years):
    at_risk = sum(1 for s in time if s >= t)
    deaths = sum(1 for s, e in zip(time, event) if s == t and e)
    if at_risk:
      value *= 1.0 - deaths / at_risk
    survival.append(max(value, 1e-6))
  return survival


def brute_c_index(probs, ytc, ytf, weighting="reference", convention="mirai"):
  num_years = probs.shape[1]
  time, event = brute_event_times(ytc, ytf, num_years)
  survival = brute_km(time, event, num_years)
  numerator = denominator = 0.0
  for j in range(len(time)):
    if not event[j]:
      continue
    for i in range(len(time)):
      if i == j or time[i] < 0:
        continue
      comparable = time[j] < time[i] if event[i] else time[j] <= time[i]
      if not comparable:
        continue
      later = time[i]
      weight = 1.0 if weighting == "none" else 1.0 / survival[later] ** 2
      query_column = later if convention == "mirai" else (later - 1) % num_years
      earlier_score, later_score = probs[j, later], probs[i, query_column]
      score = 1.0 if earlier_score > later_score else 0.5 if earlier_score == later_score else 0.0
      numerator += weight * score
      denominator += weight
  return numerator / denominator if denominator else float("nan")


def random_cohort(rng, num_exams, num_years=5, cancer_rate=0.2, levels=None):
  ytc = np.where(
    rng.random(num_exams) < cancer_rate,
    rng.integers(0, num_years + 2, num_exams) + rng.random(num_exams) * 0.9,
    NO_CANCER,
  )
  ytf = rng.integers(0, num_years + 3, num_exams) + rng.random(num_exams) * 0.9
  if levels is None:
    probs = rng.random((num_exams, num_years))
  else:  # few distinct values, so ties in predictions happen
    probs = rng.integers(0, levels, (num_exams, num_years)) / levels
  return np.sort(probs, axis=1), ytc, ytf


# ---------------------------------------------------------------------------------------------
# Event times.


def test_event_times_follow_mirai_time_at_event():
  time, event = risk.event_times(
    [0.5, 2.9, 3.0, NO_CANCER, NO_CANCER, np.inf], [0, 0, 9, 1.7, 10, 0.2], num_years=3
  )
  np.testing.assert_array_equal(time, [0, 2, 2, 0, 2, -1])
  np.testing.assert_array_equal(event, [True, True, False, False, False, False])


def test_years_from_targets_round_trips_survival_targets():
  ytc = [0, 2, 4, NO_CANCER, NO_CANCER, 7]
  ytf = [3, 1, 8, 2, 0, 9]
  built = [survival_targets(c, f, 5) for c, f in zip(ytc, ytf)]
  target = np.stack([b[0] for b in built])
  mask = np.stack([b[1] for b in built])
  back_ytc, back_ytf = risk.years_from_targets(target, mask)
  rebuilt = [survival_targets(c, f, 5) for c, f in zip(back_ytc, back_ytf)]
  np.testing.assert_array_equal(np.stack([b[0] for b in rebuilt]), target)
  np.testing.assert_array_equal(np.stack([b[1] for b in rebuilt]), mask)
  time_a, event_a = risk.event_times(ytc, ytf, 5)
  time_b, event_b = risk.event_times(back_ytc, back_ytf, 5)
  np.testing.assert_array_equal(event_a, event_b)
  np.testing.assert_array_equal(time_a[time_a >= 0], time_b[time_a >= 0])


# ---------------------------------------------------------------------------------------------
# C-index.

# Four exams, Y = 3, risk equal in every column:
#   A cancer in year index 0, risk .9;  B cancer at 1, risk .5;  C cancer at 2, risk .7;
#   D cancer-free, followed 5 years (censored at 2), risk .1.
# Comparable pairs: (A,B) (A,C) (B,C) (A,D) (B,D) (C,D); only (B,C) is discordant.
HAND_RISK = np.array([0.9, 0.5, 0.7, 0.1])
HAND_YTC = np.array([0, 1, 2, NO_CANCER])
HAND_YTF = np.array([0, 1, 2, 5])


def test_c_index_hand_case_unweighted():
  probs = np.repeat(HAND_RISK[:, None], 3, axis=1)
  assert risk.c_index(probs, HAND_YTC, HAND_YTF, weighting="none") == pytest.approx(5 / 6)


def test_c_index_hand_case_km_weighted():
  # KM with cancer as the event: S(0) = 3/4, S(1) = 1/2, S(2) = 1/4; a pair weighs 1/S(T_later)^2
  # so (A,B) weighs 4 and the five pairs ending at t = 2 weigh 16 each, one discordant.
  probs = np.repeat(HAND_RISK[:, None], 3, axis=1)
  np.testing.assert_allclose(
    risk.reference_weight_survival(HAND_YTC, HAND_YTF, 3), [0.75, 0.5, 0.25]
  )
  assert risk.c_index(probs, HAND_YTC, HAND_YTF) == pytest.approx(68 / 84)


def test_c_index_hand_case_with_censoring_tie_and_tied_risk():
  # E: cancer-free with 1 year of follow-up (censored at 0) and the same risk as A: the pair
  # (A,E) is comparable (event and censoring at the same time) and counts one half.
  probs = np.repeat(np.r_[HAND_RISK, 0.9][:, None], 3, axis=1)
  ytc, ytf = np.r_[HAND_YTC, NO_CANCER], np.r_[HAND_YTF, 1]
  assert risk.c_index(probs, ytc, ytf, weighting="none") == pytest.approx(5.5 / 7)
  s0, s1, s2 = Fraction(4, 5), Fraction(8, 15), Fraction(4, 15)
  numerator = Fraction(1, 2) / s0**2 + 1 / s1**2 + 4 / s2**2
  denominator = 1 / s0**2 + 1 / s1**2 + 5 / s2**2
  assert risk.c_index(probs, ytc, ytf) == pytest.approx(float(numerator / denominator))


def test_c_index_uses_the_column_of_the_later_time_and_bcrbench_shift():
  # A: cancer at 0; B: censored at 1. The pair is scored at column 1 (.9 > .3: concordant);
  # BCRBench reads B from column 0 (.95): discordant.
  probs = np.array([[0.2, 0.9, 0.9], [0.95, 0.3, 0.3]])
  ytc, ytf = [0, NO_CANCER], [0, 2]
  assert risk.c_index(probs, ytc, ytf) == 1.0
  assert risk.c_index(probs, ytc, ytf, convention="bcrbench") == 0.0


def test_c_index_matches_brute_force():
  rng = np.random.default_rng(0)
  for levels in (None, 4):
    probs, ytc, ytf = random_cohort(rng, 70, levels=levels)
    for weighting in ("reference", "none"):
      for convention in ("mirai", "bcrbench"):
        expected = brute_c_index(probs, ytc, ytf, weighting, convention)
        got = risk.c_index(probs, ytc, ytf, weighting=weighting, convention=convention)
        assert got == pytest.approx(expected, rel=1e-12), (levels, weighting, convention)


def test_c_index_unweighted_is_harrell_with_lifelines_rules_for_one_score():
  # One score per exam (all columns equal): Harrell's C of lifelines' concordance_index
  # (event earlier than any later exit; an event ties with a censoring at the same time).
  rng = np.random.default_rng(1)
  num_exams = 60
  time = rng.integers(0, 5, num_exams)
  event = rng.random(num_exams) < 0.4
  score = rng.integers(0, 6, num_exams).astype(float)
  ytc = np.where(event, time, NO_CANCER)
  ytf = np.where(event, 0, time + 1)
  correct = tied = pairs = 0
  for j in range(num_exams):
    for i in range(num_exams):
      if event[j] and (time[j] < time[i] or (time[j] == time[i] and not event[i])):
        pairs += 1
        correct += score[j] > score[i]
        tied += score[j] == score[i]
  probs = np.repeat(score[:, None], 5, axis=1)
  assert risk.c_index(probs, ytc, ytf, weighting="none") == pytest.approx(
    (correct + tied / 2) / pairs
  )


def test_c_index_integer_weights_equal_repeated_exams():
  rng = np.random.default_rng(2)
  probs, ytc, ytf = random_cohort(rng, 50, levels=5)
  counts = rng.integers(0, 4, 50)
  repeated = np.repeat(np.arange(50), counts)
  expected = risk.c_index(probs[repeated], ytc[repeated], ytf[repeated])
  assert risk.c_index(probs, ytc, ytf, sample_weight=counts) == pytest.approx(expected)
  batch = risk.c_index(probs, ytc, ytf, sample_weight=np.stack([counts, np.ones(50)]))
  np.testing.assert_allclose(batch, [expected, risk.c_index(probs, ytc, ytf)])


def test_c_index_without_comparable_pairs_is_nan():
  probs = np.full((3, 2), 0.5)
  assert np.isnan(risk.c_index(probs, [NO_CANCER] * 3, [4, 4, 4]))


# ---------------------------------------------------------------------------------------------
# Per-year AUC.


def test_year_labels_hand_case():
  # a: cancer at 0; b: cancer at 2; c: cancer-free 1 year; d: cancer-free 10 years;
  # e: cancer-free half a year (never counts); f: cancer after the horizon, followed 2 years.
  included, positive = risk.year_labels(
    [0, 2, NO_CANCER, NO_CANCER, NO_CANCER, 7], [0, 2, 1, 10, 0.5, 2], num_years=3
  )
  np.testing.assert_array_equal(
    positive, [[1, 1, 1], [0, 0, 1], [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]]
  )
  np.testing.assert_array_equal(
    included, [[1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 1, 1], [0, 0, 0], [1, 1, 0]]
  )


def test_auc_per_year_matches_sklearn_with_inclusion_rule():
  metrics = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(3)
  probs, ytc, ytf = random_cohort(rng, 400, levels=20)
  weights = rng.integers(0, 3, 400)
  aucs = risk.auc_per_year(probs, ytc, ytf)
  weighted = risk.auc_per_year(probs, ytc, ytf, sample_weight=weights)
  for year in range(1, 6):
    labels, scores, kept = [], [], []
    for n in range(400):  # the rule as Mirai's compute_auc_x_year_auc states it
      cancer = ytc[n] < 5
      time = int(ytc[n]) if cancer else int(min(int(ytf[n]), 5)) - 1
      positive = cancer and time <= year - 1
      if positive or time >= year - 1:
        labels.append(positive)
        scores.append(probs[n, year - 1])
        kept.append(n)
    assert aucs[year] == pytest.approx(metrics.roc_auc_score(labels, scores))
    assert weighted[year] == pytest.approx(
      metrics.roc_auc_score(labels, scores, sample_weight=weights[kept])
    )


def test_auc_single_class_year_is_nan():
  probs = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
  aucs = risk.auc_per_year(probs, [1, NO_CANCER, NO_CANCER], [0, 3, 3])
  assert np.isnan(aucs[1])  # nobody has cancer in year 1
  assert aucs[2] == 0.0  # the one case has the lowest year-2 risk


def test_roc_curve_area_equals_auc():
  rng = np.random.default_rng(4)
  scores = rng.integers(0, 10, 300) / 10
  labels = rng.random(300) < scores
  fpr, tpr, _ = risk.roc_curve(scores, labels)
  area = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)
  wins = (scores[labels][:, None] > scores[~labels][None, :]).sum()
  ties = (scores[labels][:, None] == scores[~labels][None, :]).sum()
  assert area == pytest.approx((wins + ties / 2) / (labels.sum() * (~labels).sum()))
  assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)


# ---------------------------------------------------------------------------------------------
# Bootstrap.


def test_bootstrap_ci_contains_point_and_shrinks_with_n():
  rng = np.random.default_rng(5)
  widths = []
  for num_exams in (300, 6000):
    probs, ytc, ytf = random_cohort(rng, num_exams)
    probs = np.clip(probs + 0.3 * (ytc < 5)[:, None], 0, 1)  # informative risk
    point, low, high = bootstrap.bootstrap_ci(
      lambda w: risk.c_index(probs, ytc, ytf, sample_weight=w), num_exams, n_resamples=200, seed=0
    )
    assert point == pytest.approx(risk.c_index(probs, ytc, ytf))
    assert low < point < high
    widths.append(high - low)
  assert widths[1] < widths[0] / 2


def test_bootstrap_is_seeded_stratified_and_clusters_patients():
  event = np.array([1, 0, 0, 1, 0, 0, 0, 0, 1, 0], bool)
  patients = np.array([0, 0, 1, 1, 2, 3, 3, 3, 4, 4])

  def draws(weights):
    return weights

  a = bootstrap.bootstrap_samples(draws, 10, n_resamples=50, seed=7, strata=event)
  b = bootstrap.bootstrap_samples(draws, 10, n_resamples=50, seed=7, strata=event)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a[:, event].sum(axis=1), 3)
  np.testing.assert_array_equal(a[:, ~event].sum(axis=1), 7)
  by_patient = bootstrap.bootstrap_samples(draws, 10, n_resamples=50, seed=7, patient_ids=patients)
  for members in ([0, 1], [2, 3], [5, 6, 7], [8, 9]):
    np.testing.assert_array_equal(by_patient[:, members].std(axis=1), 0)
  np.testing.assert_array_equal(by_patient[:, [0, 2, 4, 5, 8]].sum(axis=1), 5)


# ---------------------------------------------------------------------------------------------
# Subgroups and report.


def test_subgroup_metrics_equal_metrics_on_each_subset():
  rng = np.random.default_rng(6)
  probs, ytc, ytf = random_cohort(rng, 300)
  density = rng.integers(1, 5, 300)
  survival = risk.reference_weight_survival(ytc, ytf, 5)
  blocks = risk_report.subgroup_metrics(probs, ytc, ytf, {"density": density})["density"]
  assert sorted(blocks) == ["1", "2", "3", "4"]
  for value, block in blocks.items():
    members = density == int(value)
    assert block["num_exams"] == members.sum()
    assert block["c_index"]["point"] == pytest.approx(
      risk.c_index(probs[members], ytc[members], ytf[members], weight_survival=survival)
    )
    aucs = risk.auc_per_year(probs[members], ytc[members], ytf[members])
    for year, auc in aucs.items():
      got = block["auc_year"][str(year)]["point"]
      assert (got is None and np.isnan(auc)) or got == pytest.approx(auc)


def test_risk_report_is_json_with_intervals_counts_and_nulls():
  rng = np.random.default_rng(8)
  probs, ytc, ytf = random_cohort(rng, 200)
  ytc[(ytc < 1)] = NO_CANCER  # no cancer in year 1: its AUC is NaN, written as null
  report = risk_report.risk_report(
    probs, ytc, ytf, {"cancer_type": np.where(ytc < 5, "idc", "none")}, n_bootstrap=50, seed=0
  )
  text = json.dumps(report, allow_nan=False)
  again = json.loads(text)
  assert again["auc_year"]["1"]["point"] is None
  assert again["counts_year"]["1"]["positives"] == 0
  c = again["c_index"]
  assert c["low"] <= c["point"] <= c["high"] and c["valid_resamples"] == 50
  included, positive = risk.year_labels(ytc, ytf, 5)
  assert again["counts_year"]["3"] == {
    "positives": int(positive[:, 2].sum()),
    "negatives": int((included & ~positive)[:, 2].sum()),
  }
  assert set(again["subgroups"]["cancer_type"]) == {"idc", "none"}


@pytest.mark.parametrize(
  "change, name",
  [
    (lambda p, c, f: (np.where(np.eye(*p.shape, dtype=bool), np.nan, p), c, f), "probs"),
    (lambda p, c, f: (p, c, -f), "years_to_followup"),
    (lambda p, c, f: (p, c[:-1], f), "years_to_cancer"),
    (lambda p, c, f: (p, np.where(c > 50, np.nan, c), f), "years_to_cancer"),
    (lambda p, c, f: (p[:, 0], c, f), "probs"),
  ],
)
def test_bad_input_raises_value_error_naming_the_array(change, name):
  rng = np.random.default_rng(9)
  args = change(*random_cohort(rng, 20))
  for fn in (risk.c_index, risk.auc_per_year, risk_report.risk_report):
    with pytest.raises(ValueError, match=name):
      fn(*args)


# ---------------------------------------------------------------------------------------------
# Calibration and files.


def test_calibration_without_censoring_is_the_cancer_fraction_per_bin():
  rng = np.random.default_rng(10)
  probs, ytc, _ = random_cohort(rng, 500, cancer_rate=0.3)
  ytf = np.full(500, 10.0)  # everyone followed past the horizon
  arrays = calibration.calibration_by_bin(probs, ytc, ytf, num_bins=10)
  assert arrays["predicted"].shape == (5, 10)
  np.testing.assert_array_equal(arrays["num_exams"], 50)
  for column in range(5):
    order = np.argsort(probs[:, column], kind="stable")
    for b in range(10):
      members = order[b * 50 : (b + 1) * 50]
      assert arrays["observed"][column, b] == pytest.approx(np.mean(ytc[members] < column + 1))
      assert arrays["predicted"][column, b] == pytest.approx(probs[members, column].mean())
  with pytest.raises(ValueError, match="probs"):
    calibration.calibration_by_bin(probs * 2, ytc, ytf)


def test_write_risk_report_writes_json_and_pngs(tmp_path):
  pytest.importorskip("matplotlib")
  from mammojax.viz import risk_plots

  rng = np.random.default_rng(11)
  probs, ytc, ytf = random_cohort(rng, 120)
  report = risk_report.risk_report(probs, ytc, ytf, None, n_bootstrap=20, seed=0)
  paths = risk_plots.write_risk_report(tmp_path / "eval", report, probs, ytc, ytf)
  assert json.loads(paths["report"].read_text()) == json.loads(json.dumps(report))
  for key in ("roc", "calibration"):
    data = paths[key].read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000
  assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
    "calibration.png",
    "report.json",
    "roc_per_year.png",
  ]
