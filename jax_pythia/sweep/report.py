"""The study's figures and a short report.md, drawn from a sweep's stored tables.

Nothing is recomputed from checkpoints: everything comes from metrics.parquet,
pairwise_cka.parquet and checkpoints.parquet under the sweep's output directory
(`tools.report` redraws them).
Figures (PNG and PDF under <out>/figures):
  cka_bands[_debiased]   CKA to the final checkpoint, 10/25/50/75/90th percentiles across
                         layers per checkpoint (the paper's Figure 1), with the noise floor
  per_over_training      PER of weights and gradients over training, a line per model
  per_vs_convergence     each layer's PER against its convergence (CKA area over log-steps)
  evals                  downstream accuracy on the same step axis (with --evals_dir)
  pairwise_cka           CKA between every pair of checkpoints, mean over layers
report.md ends with the metrics in the tables and their formulas (analysis.registry).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import matplotlib
import numpy as np
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import analysis  # noqa: E402
from analysis import registry  # noqa: E402
from jax_pythia.errors import SweepError  # noqa: E402
from jax_pythia.files import atomic_write  # noqa: E402
from jax_pythia.sweep.labels import label_of, model_order, suite_labels  # noqa: E402, F401

COMPONENT_LABELS = {
  "ov": "attention OV (whole layer)",
  "ov_head": "attention OV (per head)",
  "mlp": "MLP output (dense_4h_to_h, down_proj)",
  "resid": "residual stream",
}
BAND_COMPONENTS = ("ov", "mlp")
EVAL_TASKS = ("lambada_openai", "arc_easy", "piqa", "sciq")


def _save(fig, out_dir: str, name: str) -> list[str]:
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for ext in ("png", "pdf"):
    path = os.path.join(out_dir, f"{name}.{ext}")
    save = lambda tmp, ext=ext: fig.savefig(tmp, dpi=130, bbox_inches="tight", format=ext)  # noqa: E731
    atomic_write(path, save, "." + ext)
    paths.append(path)
  plt.close(fig)
  return paths


def _log_axis(ax):
  # symlog: step 0 (initialisation) stays on a log-like axis.
  ax.set_xscale("symlog", linthresh=1)
  ax.set_xlim(left=0)
  ax.set_xlabel("training step")


def cka_table(
  metrics: pd.DataFrame, model: str, component: str, estimator: str
) -> tuple[np.ndarray, np.ndarray]:
  """(steps [C], CKA [C, L]) of whole-layer values."""
  rows = metrics[
    (metrics.model == model)
    & (metrics.component == component)
    & (metrics.metric == estimator)
    & (metrics["head"] == -1)
  ]
  table = rows.pivot_table(index="step", columns="layer", values="value")
  return table.index.to_numpy(), table.to_numpy()


def flagged_checkpoints(status: pd.DataFrame | None) -> pd.DataFrame:
  """Checkpoints whose weights duplicate another step's (checkpoints.parquet's `flag`,
  jax_pythia.checkpoints.integrity): model, step, status, flag. Empty when none or not recorded."""
  columns = ["model", "step", "status", "flag"]
  if status is None or "flag" not in status:
    return pd.DataFrame(columns=columns)
  return status.loc[status.flag.fillna("") != "", columns].reset_index(drop=True)


def _mark_flagged(ax, flagged: pd.DataFrame | None, model: str, color: str = "C3") -> None:
  """A dotted line at each flagged step of `model`: its weights are another step's."""
  if flagged is None:
    return
  for i, step in enumerate(flagged.loc[flagged.model == model, "step"]):
    ax.axvline(
      step, color=color, ls=":", lw=1, label="duplicate weights (report.md)" if i == 0 else None
    )


def figure_cka_bands(
  metrics: pd.DataFrame,
  models: Sequence[str],
  out_dir: str,
  estimator: str,
  flagged: pd.DataFrame | None = None,
  labels: dict[str, str] | None = None,
) -> list[str]:
  fig, axes = plt.subplots(
    len(BAND_COMPONENTS),
    len(models),
    squeeze=False,
    figsize=(3.2 * len(models) + 1, 3.0 * len(BAND_COMPONENTS)),
    sharey=True,
    constrained_layout=True,
  )
  for col, model in enumerate(models):
    for row, component in enumerate(BAND_COMPONENTS):
      ax = axes[row, col]
      steps, values = cka_table(metrics, model, component, estimator)
      if len(steps) == 0:
        ax.set_visible(False)
        continue
      bands = np.asarray(analysis.percentile_bands(values.astype(np.float32)))  # [5, C]
      ax.fill_between(steps, bands[0], bands[4], alpha=0.2, color="C0", label="10-90%")
      ax.fill_between(steps, bands[1], bands[3], alpha=0.4, color="C0", label="25-75%")
      ax.plot(steps, bands[2], color="C0", lw=1.5, label="median")
      floor = metrics[
        (metrics.model == model)
        & (metrics.component == component)
        & (metrics.metric == analysis.noise_floor_name(estimator))
        & (metrics["head"] == -1)
      ]
      if len(floor):
        ax.axhline(
          floor.value.mean(), color="C3", ls="--", lw=1, label="noise floor (rows permuted)"
        )
      _mark_flagged(ax, flagged, model)
      _log_axis(ax)
      ax.set_title(f"{label_of(labels, model)}\n{COMPONENT_LABELS[component]}", fontsize=9)
      if col == 0:
        ax.set_ylabel(f"{'debiased ' if 'debiased' in estimator else ''}CKA to final")
  axes[0, 0].legend(fontsize=7, loc="lower right")
  fig.suptitle(
    "Convergence of layer activations to the final checkpoint (percentiles across layers)",
    fontsize=10,
  )
  return _save(fig, out_dir, "cka_bands" + ("_debiased" if "debiased" in estimator else ""))


def figure_per(
  metrics: pd.DataFrame,
  models: Sequence[str],
  out_dir: str,
  flagged: pd.DataFrame | None = None,
  labels: dict[str, str] | None = None,
) -> list[str]:
  fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), squeeze=False, constrained_layout=True)
  per_rows = (("per", "weights"), (analysis.gradient_name("per"), "gradients"))
  for row, (metric, what) in enumerate(per_rows):
    for col, component in enumerate(("ov", "mlp")):
      ax = axes[row, col]
      for i, model in enumerate(models):
        rows = metrics[
          (metrics.model == model) & (metrics.component == component) & (metrics.metric == metric)
        ]
        if rows.empty:
          continue
        curve = rows.groupby("step")["value"].mean()
        shown = label_of(labels, model)
        ax.plot(curve.index, curve.values, marker=".", ms=3, color=f"C{i}", label=shown)
        _mark_flagged(ax, flagged, model, color=f"C{i}")
      _log_axis(ax)
      ax.set_ylabel("PER (mean over layers)")
      ax.set_title(f"{what}: {COMPONENT_LABELS[component]}", fontsize=9)
  axes[0, 0].legend(fontsize=7)
  fig.suptitle("Proportional effective rank over training", fontsize=10)
  return _save(fig, out_dir, "per_over_training")


def per_convergence_points(
  metrics: pd.DataFrame, models: Sequence[str], component: str, estimator: str
) -> pd.DataFrame:
  """One row per (model, layer): final-checkpoint PER and CKA area over log-steps."""
  points = []
  for model in models:
    steps, values = cka_table(metrics, model, component, estimator)
    if len(steps) < 2:
      continue
    auc = np.asarray(analysis.area_under_log_step_curve(values.T.astype(np.float32), steps))
    final = metrics[
      (metrics.model == model)
      & (metrics.component == component)
      & (metrics.metric == "per")
      & (metrics.step == steps.max())
    ]
    per = final.set_index("layer")["value"].sort_index().to_numpy()
    points += [
      dict(model=model, layer=l, per=p, cka_auc=a) for l, (p, a) in enumerate(zip(per, auc))
    ]
  return pd.DataFrame(points)


def figure_per_vs_convergence(
  metrics: pd.DataFrame,
  models: Sequence[str],
  out_dir: str,
  estimator: str,
  labels: dict[str, str] | None = None,
) -> tuple[list[str], dict]:
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
  stats = {}
  for col, component in enumerate(("ov", "mlp")):
    ax = axes[0, col]
    points = per_convergence_points(metrics, models, component, estimator)
    if points.empty:
      continue
    for i, (model, group) in enumerate(points.groupby("model", sort=False)):
      ax.scatter(group.per, group.cka_auc, color=f"C{i}", s=18, label=label_of(labels, model))
    if len(points) >= 3:
      corr = analysis.per_convergence_correlation(
        jax.numpy.asarray(points.per.to_numpy(np.float32)),
        jax.numpy.asarray(points.cka_auc.to_numpy(np.float32)),
        jax.random.PRNGKey(0),
      )
      corr = {k: float(v) for k, v in corr.items()}
      stats[component] = corr
      ax.set_title(
        f"{COMPONENT_LABELS[component]}\nSpearman {corr['spearman']:.2f} "
        f"[{corr['spearman_low']:.2f}, {corr['spearman_high']:.2f}], Pearson "
        f"{corr['pearson']:.2f}",
        fontsize=9,
      )
    ax.set_xlabel("PER of the weights at the final checkpoint")
    ax.set_ylabel(f"{estimator} to final, mean over log-steps")
  axes[0, 0].legend(fontsize=7)
  fig.tight_layout()
  return _save(fig, out_dir, "per_vs_convergence"), stats


def figure_evals(
  evals: pd.DataFrame,
  models: Sequence[str],
  out_dir: str,
  labels: dict[str, str] | None = None,
) -> list[str]:
  models = [m for m in models if m in set(evals.model)]
  tasks = [t for t in EVAL_TASKS if t in set(evals.task)]
  if not models or not tasks:
    return []
  fig, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks), 3.2), squeeze=False)
  for col, task in enumerate(tasks):
    ax = axes[0, col]
    for i, model in enumerate(models):
      rows = evals[(evals.model == model) & (evals.task == task) & (evals.metric == "acc")]
      rows = rows.sort_values("step")
      ax.plot(rows.step, rows.value, marker=".", color=f"C{i}", label=label_of(labels, model))
    _log_axis(ax)
    ax.set_title(task, fontsize=9)
    ax.set_ylabel("accuracy (zero-shot)")
  axes[0, 0].legend(fontsize=7)
  fig.tight_layout()
  return _save(fig, out_dir, "evals")


def figure_pairwise(
  pairwise: pd.DataFrame,
  out_dir: str,
  estimator: str,
  order: Sequence[str] = (),
  labels: dict[str, str] | None = None,
) -> list[str]:
  """CKA between the checkpoints of each model (never across models), models in `order`."""
  rows = pairwise[
    (pairwise.metric == estimator)
    & (pairwise["head"] == -1)
    & pairwise.component.isin(BAND_COMPONENTS)
  ]
  present = set(rows.model)
  models = [m for m in order if m in present] + sorted(present - set(order))
  if not models:
    return []
  fig, axes = plt.subplots(
    len(BAND_COMPONENTS),
    len(models),
    squeeze=False,
    figsize=(3.3 * len(models) + 1, 3 * len(BAND_COMPONENTS)),
  )
  for col, model in enumerate(models):
    for row, component in enumerate(BAND_COMPONENTS):
      ax = axes[row, col]
      sel = rows[(rows.model == model) & (rows.component == component)]
      matrix = sel.pivot_table(index="step", columns="other_step", values="value")
      image = ax.imshow(matrix.to_numpy(), vmin=0, vmax=1, cmap="viridis", origin="lower")
      ticks = np.linspace(0, len(matrix) - 1, min(len(matrix), 5)).astype(int)
      tick_labels = [str(matrix.index[t]) for t in ticks]
      ax.set_xticks(ticks, tick_labels, fontsize=6, rotation=45)
      ax.set_yticks(ticks, tick_labels, fontsize=6)
      ax.set_title(f"{label_of(labels, model)}\n{COMPONENT_LABELS[component]}", fontsize=9)
  fig.colorbar(image, ax=axes, shrink=0.6, label=f"{estimator}, mean over layers")
  return _save(fig, out_dir, "pairwise_cka")


def write_report(
  out_dir: str, evals_dir: str | None = None, estimators: Sequence[str] = ("cka", "cka_debiased")
) -> list[str]:
  """Draws every figure and report.md from <out_dir>'s tables; returns the paths written."""
  metrics_path = os.path.join(out_dir, "metrics.parquet")
  if not os.path.exists(metrics_path):
    raise SweepError(f"{metrics_path} not found: run tools.sweep with --out={out_dir} first")
  metrics = pd.read_parquet(metrics_path)
  status_path = os.path.join(out_dir, "checkpoints.parquet")
  status = pd.read_parquet(status_path) if os.path.exists(status_path) else None
  models = model_order(metrics, status)
  pairwise_path = os.path.join(out_dir, "pairwise_cka.parquet")
  pairwise = pd.read_parquet(pairwise_path) if os.path.exists(pairwise_path) else None
  figures = os.path.join(out_dir, "figures")
  written = []
  flagged = flagged_checkpoints(status)
  labels = suite_labels(models, status)
  for estimator in estimators:
    written += figure_cka_bands(metrics, models, figures, estimator, flagged, labels)
  written += figure_per(metrics, models, figures, flagged, labels)
  paths, stats = figure_per_vs_convergence(metrics, models, figures, estimators[0], labels)
  written += paths
  if pairwise is not None and not pairwise.empty:
    written += figure_pairwise(pairwise, figures, estimators[-1], models, labels)
  evals_note = "no --evals_dir given"
  if evals_dir:
    from jax_pythia.sweep.evals import load_evals

    drawn = figure_evals(load_evals(evals_dir), models, figures, labels)
    written += drawn
    evals_note = "figures/evals.png" if drawn else f"no swept model has evaluations in {evals_dir}"
  report_path = os.path.join(out_dir, "report.md")
  text = (
    _report_text(metrics, models, stats, estimators, evals_note, labels)
    + _models_text(models, status)
    + _flagged_text(flagged)
    + _metrics_text(metrics)
  )
  atomic_write(report_path, lambda tmp: _write_text(tmp, text), ".md")
  return written + [report_path]


def _write_text(path: str, text: str) -> None:
  with open(path, "w") as f:
    f.write(text)


def _report_text(
  metrics: pd.DataFrame,
  models: Sequence[str],
  stats: dict,
  estimators,
  evals_note: str,
  labels: dict[str, str] | None = None,
) -> str:
  lines = ["# Sweep report", ""]
  lines += [
    f"Models (by parameter count): {', '.join(label_of(labels, m) for m in models)}. "
    "Checkpoints per model: "
    + ", ".join(f"{m} {metrics[metrics.model == m].step.nunique()}" for m in models)
    + ".",
    "",
  ]
  lines += _convergence_lines(metrics, models, estimators, labels)
  lines += [
    "",
    "## PER at the final checkpoint (mean over layers)",
    "",
    "| model | component | weights | gradients |",
    "|---|---|---|---|",
  ]
  for model in models:
    final = metrics[(metrics.model == model)]
    final = final[final.step == final.step.max()]
    for component in analysis.COMPONENTS:
      w = final[(final.component == component) & (final.metric == "per")].value.mean()
      g = final[
        (final.component == component) & (final.metric == analysis.gradient_name("per"))
      ].value.mean()
      lines.append(f"| {label_of(labels, model)} | {component} | {w:.3f} | {g:.3f} |")
  lines += ["", "## PER vs convergence (layers pooled over models)", ""]
  for component, s in stats.items():
    lines.append(
      f"- {component}: Spearman {s['spearman']:.2f} (95% bootstrap "
      f"[{s['spearman_low']:.2f}, {s['spearman_high']:.2f}]), Pearson "
      f"{s['pearson']:.2f} ([{s['pearson_low']:.2f}, {s['pearson_high']:.2f}])"
    )
  lines += [
    "",
    f"Downstream evaluations: {evals_note}.",
    "",
    "Figures: figures/cka_bands.png, figures/cka_bands_debiased.png, "
    "figures/per_over_training.png, figures/per_vs_convergence.png, "
    "figures/pairwise_cka.png.",
    "",
  ]
  return "\n".join(lines)


def _convergence_lines(
  metrics: pd.DataFrame, models: Sequence[str], estimators, labels: dict[str, str] | None
) -> list[str]:
  """report.md's convergence table: per model, component and estimator."""
  lines = [
    "## Convergence (whole-layer CKA to the final checkpoint)",
    "",
    "| model | component | estimator | median CKA at first step | first step with "
    "median >= 0.9 | noise floor |",
    "|---|---|---|---|---|---|",
  ]
  for model in models:
    for component in BAND_COMPONENTS:
      for estimator in estimators:
        steps, values = cka_table(metrics, model, component, estimator)
        if not len(steps):
          continue
        median = np.median(values, axis=1)
        converged = float(analysis.convergence_step(jax.numpy.asarray(median), steps, 0.9))
        first = "never" if np.isnan(converged) else str(int(converged))
        floor = metrics[
          (metrics.model == model)
          & (metrics.component == component)
          & (metrics.metric == analysis.noise_floor_name(estimator))
          & (metrics["head"] == -1)
        ]
        lines.append(
          f"| {label_of(labels, model)} | {component} | {estimator} | {median[0]:.3f} | {first} | "
          f"{floor.value.mean():.3f} |"
        )
  return lines


def _models_text(models: Sequence[str], status: pd.DataFrame | None) -> str:
  """report.md's table of the models side by side, smallest first: suite, family, size."""
  lines = ["## Models", "", "| model | suite | family | parameters |", "|---|---|---|---|"]
  for model in models:
    rows = status[status.model == model] if status is not None else pd.DataFrame()
    suite, family = (_first(rows, column) for column in ("suite", "family"))
    n = rows["parameters"].dropna().max() if "parameters" in rows else np.nan
    size = f"{int(n):,}" if pd.notna(n) else ""
    lines.append(f"| {model} | {suite} | {family} | {size} |")
  return "\n".join(lines + ["", ""])


def _first(rows: pd.DataFrame, column: str) -> str:
  values = rows[column].dropna() if column in rows else []
  return str(values.iloc[0]) if len(values) else ""


def _flagged_text(flagged: pd.DataFrame) -> str:
  """report.md's list of checkpoints whose weights are another step's (by content hash)."""
  lines = ["## Checkpoints with duplicate weights", ""]
  if flagged.empty:
    return "\n".join(lines + ["None: every checkpoint's weights hash differently.", ""])
  lines += [
    "Their weights hash equal to another step's (checkpoints.parquet: weights_hash, "
    "same_as_step); the figures mark them with dotted lines. step0 = step1 is a property "
    "of the Pythia suite; a non-final step equal to the final is a defect of the Hub "
    "branch. `--on_duplicate=skip` does not compute them.",
    "",
    "| model | step | status | flag |",
    "|---|---|---|---|",
  ]
  for row in flagged.itertuples():
    lines.append(f"| {row.model} | {row.step} | {row.status} | {row.flag} |")
  return "\n".join(lines + [""])


def _metrics_text(metrics: pd.DataFrame) -> str:
  """report.md's list of the metrics in the tables, each with its formula (the registry)."""
  lines = ["## Metrics", "", "| metric | data: formula |", "|---|---|"]
  for name in sorted(metrics.metric.unique()):
    how = registry.formula(name) or "not registered in this process (a --metrics_module?)"
    lines.append(f"| {name} | {how.replace('|', '/')} |")
  return "\n".join(lines + [""])
