"""Results of several runs side by side: runs grouped by config (seeds pooled), the paper's table as Markdown, CSV
and LaTeX, and two figures: accuracy against Rel. BOPs with its Pareto front, and sparsity and dead zones over the
epochs (the paper's Fig. 4).

Runs form one group when their resolved ``config.yaml`` agree on every key except ``seed``, ``run_name``,
``save_dir``, ``wandb_project`` and the run-time keys that only say how a run executes (``device``, ``workers``,
``amp``, ``data_dir``, ...); ``epochs`` and ``report`` (how BOPs are counted) do count. A group's Acc (%) and
Rel. BOPs (%) are the mean and the sample standard deviation (n - 1) over its runs' last logged epochs, written
``mean ± std`` with two decimals; a group of one run shows its value alone, as the paper does for a single run.
"""
from __future__ import annotations

import csv
import inspect
import io
import json
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codeq.app.config import flatten, runtime_keys
from codeq.errors import ArgumentError
from codeq.io import atomic_write
from codeq.quantizers import QUANTIZER_REGISTRY
from codeq.quantizers.base import nominal_bits

METHOD_NAMES = {"deadzone": "CoDeQ", "uniform": "Uniform QAT"}
SUMMARY_COLUMNS = ("Method", "Weights", "Pruning", "Acc (%)", "Rel. BOPs (%)")
# Keys that never split runs into groups, beside the run-time keys; of those, these two change the numbers.
UNGROUPED_KEYS = ("seed", "run_name", "save_dir", "wandb_project")
GROUPED_RUNTIME_KEYS = ("epochs", "report")
FIGURE_FORMATS = {".png": "png", ".pdf": "pdf"}
LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$",
                 "{": r"\{", "}": r"\}", "λ": r"$\lambda$", "–": "--"}


def percent(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}"


def markdown_table(header: list[str] | tuple[str, ...], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def method_name(config: dict[str, Any]) -> str:
    quantizer = config.get("quantizer")
    if not quantizer:
        return "FP32 baseline"
    return METHOD_NAMES.get(quantizer["name"], quantizer["name"])


@dataclass
class RunResult:
    """One run directory's numbers: its resolved config, its ``metrics.jsonl`` records (one per epoch, in order, at
    least one), and ``rel_bops``, the Rel. BOPs of its last epoch (a fraction; an FP32 run's from its report, since
    its epochs log none)."""

    run_dir: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    rel_bops: float

    @property
    def final(self) -> dict[str, Any]:
        return self.records[-1]

    @property
    def finished(self) -> bool:
        return self.final["epoch"] >= self.config["epochs"]


def group_key(config: dict[str, Any]) -> dict[str, Any]:
    """The flattened config keys that decide a run's group (module docstring)."""
    ignored = set(UNGROUPED_KEYS) | (set(runtime_keys()) - set(GROUPED_RUNTIME_KEYS))
    return {key: value for key, value in flatten(config).items() if key.split(".")[0] not in ignored}


@dataclass
class Statistic:
    """Mean and sample standard deviation of per-run values; ``std`` is None for a single run."""

    values: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def text(self, plus_minus: str = " ± ") -> str:
        return f"{self.mean:.2f}" + ("" if self.std is None else f"{plus_minus}{self.std:.2f}")


@dataclass
class Group:
    """Runs that differ only in keys that do not group (seeds); ``setting`` names the keys that set it apart from
    the other groups of the same method, weights and pruning (a λ sweep's λ)."""

    runs: list[RunResult]
    setting: str = ""

    @property
    def config(self) -> dict[str, Any]:
        return self.runs[0].config

    @property
    def method(self) -> str:
        return method_name(self.config) + (f" ({self.setting})" if self.setting else "")

    @property
    def weights(self) -> str:
        return weights_label(self.config, self.runs[0].final)

    @property
    def pruning(self) -> str:
        return "Unstruc." if any(run.final.get("sparsity", 0.0) > 0 for run in self.runs) else "None"

    @property
    def accuracy(self) -> Statistic:
        return Statistic([100 * run.final["val_acc"] for run in self.runs])

    @property
    def rel_bops(self) -> Statistic:
        return Statistic([100 * run.rel_bops for run in self.runs])

    @property
    def sparsity(self) -> Statistic | None:
        values = [run.final.get("sparsity") for run in self.runs]
        return None if None in values else Statistic([100 * value for value in values])

    def row(self) -> list[str]:
        return [self.method, self.weights, self.pruning, self.accuracy.text(), self.rel_bops.text(),
                str(len(self.runs))]


def weights_label(config: dict[str, Any], final: dict[str, Any]) -> str:
    """The paper's Weights column: ``32-bit``, ``MP`` for learned bit-widths, else the fixed bit-width."""
    quantizer = config.get("quantizer")
    if not quantizer:
        return "32-bit"
    kwargs = quantizer.get("kwargs") or {}
    cls = QUANTIZER_REGISTRY.get(quantizer["name"])
    if cls is None:  # a plugin's quantizer whose plugin was not imported: the logged bit-widths say it
        return f"{final.get('mean_bits', 32):g}-bit"
    parameters = inspect.signature(cls.__init__).parameters
    learnable = parameters["learnable_bit"].default if "learnable_bit" in parameters else False
    if kwargs.get("learnable_bit", learnable):
        return "MP"
    bits = nominal_bits(cls, kwargs)
    return f"{bits}-bit" if bits is not None else f"{final.get('mean_bits', 32):g}-bit"


def group_runs(results: Iterable[RunResult]) -> list[Group]:
    """The runs grouped (module docstring), groups in the order their first run was given."""
    groups: dict[str, Group] = {}
    for result in results:
        key = json.dumps(group_key(result.config), sort_keys=True, default=str)
        groups.setdefault(key, Group([])).runs.append(result)
    ordered = list(groups.values())
    name_settings(ordered)
    return ordered


def name_settings(groups: list[Group]) -> None:
    """Name what sets apart groups that share method, weights and pruning: each group after the first of its kind
    by the keys in which it differs from that first one, the first by all the keys so named."""
    clusters: dict[tuple[str, str, str], list[Group]] = {}
    for group in groups:
        clusters.setdefault((method_name(group.config), group.weights, group.pruning), []).append(group)
    for first, *others in clusters.values():
        reference = group_key(first.config)
        named: set[str] = set()
        for group in others:
            flat = group_key(group.config)
            keys = [key for key in sorted(flat.keys() | reference.keys())
                    if json.dumps(flat.get(key)) != json.dumps(reference.get(key))]
            named.update(keys)
            group.setting = setting_text(keys, flat, group.config)
        first.setting = setting_text(sorted(named), reference, first.config)


def setting_text(keys: list[str], flat: dict[str, Any], config: dict[str, Any]) -> str:
    return ", ".join(f"{key_text(key, config)}={value_text(flat[key])}" for key in keys if key in flat)


def key_text(key: str, config: dict[str, Any]) -> str:
    """A config key as a table label: ``loss_terms.0.lambda`` -> ``dz_l2 λ``, ``optimizer.param_groups.dz.lr`` ->
    ``dz lr``, ``quantizer.kwargs.max_bits`` -> ``max_bits``; other keys as they are."""
    parts = key.split(".")
    if parts[0] == "loss_terms" and len(parts) > 2:
        name = config["loss_terms"][int(parts[1])]["name"]
        return f"{name} {'λ' if parts[2] == 'lambda' else parts[-1]}"
    if parts[:2] == ["optimizer", "param_groups"] and len(parts) > 3:
        return f"{parts[2]} {'.'.join(parts[3:])}"
    if parts[:2] == ["quantizer", "kwargs"] and len(parts) > 2:
        return ".".join(parts[2:])
    return key


def value_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def bops_note(groups: list[Group]) -> str:
    settings = {(g.config.get("report") or {}).get("activation_bits", 32) for g in groups}, \
        {(g.config.get("report") or {}).get("fp_weight_bits", 32) for g in groups}
    activations, fp_weights = (", ".join(str(bits) for bits in sorted(values)) for values in settings)
    return (f"Rel. BOPs count {activations}-bit activations and {fp_weights}-bit weights in layers left in FP32, "
            f"relative to 32-bit weights and activations (docs/compression.md)")


def markdown(groups: list[Group]) -> str:
    """The paper's table of ``groups`` and what its numbers are."""
    rows = markdown_table([*SUMMARY_COLUMNS, "n"], [group.row() for group in groups])
    notes = ["Acc and Rel. BOPs: mean ± sample standard deviation over the n runs of a row (seeds), each at its "
             "last logged epoch; a row of one run shows its value alone.", bops_note(groups)]
    listing = [f"{index}. {group.method} | {group.weights}: {' '.join(str(run.run_dir) for run in group.runs)}"
               for index, group in enumerate(groups, 1)]
    return "\n".join([rows, "", *notes, "", "Runs per row:", *listing])


def csv_text(groups: list[Group]) -> str:
    """One line per group: labels, n, means and sample standard deviations (empty for one run) in %, the BOPs
    settings and the run directories (separated by ``;``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "weights", "pruning", "setting", "n", "acc_mean", "acc_std", "rel_bops_mean",
                     "rel_bops_std", "sparsity_mean", "sparsity_std", "epochs", "activation_bits", "fp_weight_bits",
                     "runs"])
    for group in groups:
        report = group.config.get("report") or {}
        sparsity = group.sparsity
        writer.writerow([
            method_name(group.config), group.weights, group.pruning, group.setting, len(group.runs),
            *numbers(group.accuracy), *numbers(group.rel_bops), *(numbers(sparsity) if sparsity else ("", "")),
            group.config["epochs"], report.get("activation_bits", 32), report.get("fp_weight_bits", 32),
            ";".join(str(run.run_dir) for run in group.runs),
        ])
    return buffer.getvalue()


def numbers(statistic: Statistic) -> tuple[str, str]:
    return f"{statistic.mean:.6g}", "" if statistic.std is None else f"{statistic.std:.6g}"


def latex_escape(text: str) -> str:
    return "".join(LATEX_ESCAPES.get(character, character) for character in text)


def latex(groups: list[Group]) -> str:
    """The table as a LaTeX ``tabular`` with booktabs rules (``\\usepackage{booktabs}``)."""
    header = [latex_escape(column) for column in SUMMARY_COLUMNS] + ["$n$"]
    lines = [r"\begin{tabular}{lllrrr}", r"\toprule", " & ".join(header) + r" \\", r"\midrule"]
    plus_minus = r" \pm "
    for group in groups:
        cells = [latex_escape(group.method), latex_escape(group.weights), latex_escape(group.pruning),
                 f"${group.accuracy.text(plus_minus)}$", f"${group.rel_bops.text(plus_minus)}$", str(len(group.runs))]
        lines.append(" & ".join(cells) + r" \\")
    return "\n".join([*lines, r"\bottomrule", r"\end{tabular}"]) + "\n"


def figure_paths(path: Path, option: str) -> list[Path]:
    """The files one figure goes to: ``path`` itself for a .png or .pdf suffix, both formats without a suffix.

    Raises:
        ArgumentError: another suffix.
    """
    if path.suffix.lower() in FIGURE_FORMATS:
        return [path]
    if not path.suffix:
        return [path.with_suffix(suffix) for suffix in FIGURE_FORMATS]
    raise ArgumentError(f"{option} {path}: a figure is written as .png or .pdf (no suffix: both)")


def save_figure(figure: Any, path: Path, option: str) -> list[Path]:
    """Write ``figure`` to every file ``figure_paths`` names, each atomically; returns them."""
    paths = figure_paths(path, option)
    for target in paths:
        fmt = FIGURE_FORMATS[target.suffix.lower()]
        atomic_write(target, lambda file, fmt=fmt: figure.savefig(file, format=fmt, dpi=150, bbox_inches="tight"))
    return paths


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_front(groups: list[Group]) -> list[Group]:
    """The groups no other group beats in both: none has higher mean accuracy at lower or equal mean Rel. BOPs
    (nor equal accuracy at lower BOPs); ordered by Rel. BOPs."""
    front: list[Group] = []
    for group in sorted(groups, key=lambda g: (g.rel_bops.mean, -g.accuracy.mean)):
        if not front or group.accuracy.mean > front[-1].accuracy.mean:
            front.append(group)
    return front


def plot_pareto(groups: list[Group], path: Path) -> list[Path]:
    """Accuracy against Rel. BOPs: one point per group, seed spread (sample std) as error bars in both directions,
    the Pareto front's points ringed and joined by a dashed line; a logarithmic Rel. BOPs axis when the points span
    more than 20x."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7.0, 4.8))
    for index, group in enumerate(groups):
        accuracy, bops = group.accuracy, group.rel_bops
        axis.errorbar(bops.mean, accuracy.mean, xerr=bops.std or 0.0, yerr=accuracy.std or 0.0, fmt="o",
                      color=f"C{index % 10}", capsize=3,
                      label=f"{group.method} | {group.weights} (n={len(group.runs)})")
    front = pareto_front(groups)
    axis.plot([g.rel_bops.mean for g in front], [g.accuracy.mean for g in front], "--", color="0.4", linewidth=1,
              marker="o", markersize=11, markerfacecolor="none", zorder=0, label="Pareto front (ringed)")
    means = [group.rel_bops.mean for group in groups]
    if min(means) > 0 and max(means) / min(means) > 20:
        axis.set_xscale("log")
        axis.xaxis.set_major_formatter(plt.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_xlabel("Rel. BOPs (%, of the dense FP32 model)")
    axis.set_ylabel("validation accuracy (%)")
    axis.set_title("Accuracy against Rel. BOPs (mean ± std over seeds, last epoch)", fontsize=10)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7, loc="best")
    try:
        return save_figure(figure, path, "--plot")
    finally:
        plt.close(figure)


# The panels of the epochs figure: metrics.jsonl key, axis label, scale to the plotted unit.
EPOCH_PANELS: tuple[tuple[str, str, float], ...] = (
    ("mean_layer_sparsity", "mean layer sparsity (%)", 100.0),
    ("mean_deadzone_share", "mean dead-zone width d / 2R (%)", 100.0),
    ("mean_logit_dz", "mean |θ_dz| (dead-zone logit)", 1.0),
)


def plot_epochs(groups: list[Group], path: Path) -> list[Path]:
    """The paper's Fig. 4 for these runs: per epoch, the mean layer sparsity, the mean dead-zone width as a share
    of the robust range and the mean |θ_dz|, one line per run, coloured by group.

    Raises:
        ArgumentError: no run logs sparsity (FP32 runs only).
    """
    if not any("mean_layer_sparsity" in run.final for group in groups for run in group.runs):
        raise ArgumentError("--plot-epochs: none of these runs logs sparsity (FP32 runs only); pass quantized runs")
    plt = pyplot()
    figure, axes = plt.subplots(1, len(EPOCH_PANELS), figsize=(5.0 * len(EPOCH_PANELS), 4.0))
    for axis, (key, label, scale) in zip(axes, EPOCH_PANELS):
        for index, group in enumerate(groups):
            for number, run in enumerate(group.runs):
                points = [(record["epoch"], scale * record[key]) for record in run.records if key in record]
                if points:
                    axis.plot(*zip(*points), color=f"C{index % 10}", linewidth=1.2, alpha=0.85,
                              marker="." if len(points) < 10 else None,  # a few epochs: dots, or a lone one shows
                              label=f"{group.method} | {group.weights}" if number == 0 else None)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    figure.suptitle("Sparsity and dead zones over the epochs (one line per run)", fontsize=10)
    figure.tight_layout()
    try:
        return save_figure(figure, path, "--plot-epochs")
    finally:
        plt.close(figure)


# Each output option of ``codeq report --compare``: what it writes.
WRITERS: dict[str, Callable[[list[Group], Path], list[Path]]] = {
    "csv": lambda groups, path: write_text(path, csv_text(groups)),
    "latex": lambda groups, path: write_text(path, latex(groups)),
    "plot": plot_pareto,
    "plot_epochs": plot_epochs,
}


def write_text(path: Path, text: str) -> list[Path]:
    atomic_write(path, text)
    return [path]
