"""`codeq report --compare`: runs that differ only in their seed pooled into one row of the paper's table (mean ±
sample std of the last epochs), as Markdown, CSV and LaTeX, and the figures, from run directories with known
metrics."""
import csv
import json

import pytest
import yaml

from codeq.app import cli
from codeq.app.config import config_to_dict, validate_config
from codeq.app.results import Group, RunResult, pareto_front
from conftest import quick_config

MP = {"fixed_bit_val": 4, "max_bits": 8, "learnable_bit": True, "learnable_deadzone": True}


def make_run(tmp_path, name, finals, epochs=2, fp32=False, **overrides):
    """A run directory as training leaves it: config.yaml, metrics.jsonl with ``epochs`` records whose last has
    ``finals`` (val_acc, rel_bops, sparsity; an earlier epoch has other values), and report.json."""
    config = quick_config(tmp_path, epochs=epochs, run_name=name, **({"quantizer": None} if fp32 else {}), **overrides)
    run_dir = tmp_path / "runs" / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(validate_config(config))))
    val_acc, rel_bops, sparsity = finals
    records = []
    for epoch in range(1, epochs + 1):
        share = epoch / epochs  # the earlier epochs differ from the last: the last is what counts
        record = {"epoch": epoch, "loss": 1.0, "val_acc": val_acc * share, "lr": 0.001}
        if not fp32:
            record.update(rel_bops=rel_bops / share, sparsity=sparsity * share, mean_layer_sparsity=sparsity * share,
                          mean_deadzone_share=0.3 * share, mean_logit_dz=3 - share, mean_bits=4.0)
        records.append(record)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    (run_dir / "report.json").write_text(json.dumps({"rel_bops": 1.0 if fp32 else rel_bops}))
    return run_dir


@pytest.fixture
def table_runs(tmp_path):
    """An FP32 baseline (one run), 4-bit CoDeQ at two λ (three seeds, then one), and MP CoDeQ (two seeds)."""
    four_bit = {"loss_terms": [{"name": "dz_l2", "lambda": 0.01}]}
    runs = [make_run(tmp_path, "fp32", (0.95, None, None), fp32=True)]
    runs += [make_run(tmp_path, f"q4_seed{seed}", finals, seed=seed, device="cpu", workers=seed, **four_bit)
             for seed, finals in enumerate([(0.90, 0.030, 0.70), (0.92, 0.031, 0.72), (0.94, 0.029, 0.74)])]
    runs.append(make_run(tmp_path, "q4_strong", (0.80, 0.010, 0.90), loss_terms=[{"name": "dz_l2", "lambda": 0.1}]))
    mixed = {"quantizer": {"name": "deadzone", "kwargs": MP, "exclude_layers": ["bn"]},
             "loss_terms": [{"name": "dz_l2", "lambda": 0.01}, {"name": "bit_l2", "lambda": 0.01}]}
    runs += [make_run(tmp_path, f"mp_seed{seed}", finals, seed=seed, **mixed)
             for seed, finals in enumerate([(0.91, 0.025, 0.75), (0.93, 0.027, 0.77)])]
    return runs


def compare(capsys, runs, *options):
    code = cli.main(["report", "--compare", *map(str, runs), *map(str, options)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_seeds_pool_into_one_row_with_the_mean_and_sample_std_of_their_last_epochs(table_runs, capsys):
    code, out, _ = compare(capsys, table_runs)
    assert code == 0
    lines = out.splitlines()
    assert lines[:6] == [
        "| Method | Weights | Pruning | Acc (%) | Rel. BOPs (%) | n |",
        "|---|---|---|---|---|---|",
        "| FP32 baseline | 32-bit | None | 95.00 | 100.00 | 1 |",
        "| CoDeQ (dz_l2 λ=0.01) | 4-bit | Unstruc. | 92.00 ± 2.00 | 3.00 ± 0.10 | 3 |",
        "| CoDeQ (dz_l2 λ=0.1) | 4-bit | Unstruc. | 80.00 | 1.00 | 1 |",
        "| CoDeQ | MP | Unstruc. | 92.00 ± 1.41 | 2.60 ± 0.14 | 2 |",
    ]
    seeds = " ".join(str(run) for run in table_runs[1:4])
    assert f"2. CoDeQ (dz_l2 λ=0.01) | 4-bit: {seeds}" in lines


def test_runs_that_differ_in_more_than_seed_and_run_time_keys_are_rows_of_their_own(tmp_path, capsys):
    same = [make_run(tmp_path, f"a{seed}", (0.9, 0.03, 0.7), seed=seed, device="cpu", workers=seed,
                     data_dir=str(tmp_path / f"data{seed}"), wandb_project=f"p{seed}") for seed in range(2)]
    longer = make_run(tmp_path, "longer", (0.9, 0.03, 0.7), epochs=3)
    counted = make_run(tmp_path, "w8a8", (0.9, 0.03, 0.7), report={"activation_bits": 8})
    decay = make_run(tmp_path, "decay", (0.9, 0.03, 0.7),
                     optimizer={"type": "adamw", "param_groups": {"base": {"lr": 0.003}, "dz": {"lr": 0.01,
                                                                                               "weight_decay": 2}}})
    code, out, _ = compare(capsys, [*same, longer, counted, decay])
    rows = [line for line in out.splitlines() if line.startswith("| CoDeQ")]
    assert code == 0 and len(rows) == 4 and rows[0].endswith("| 2 |")
    assert rows[1].startswith("| CoDeQ (epochs=3) |") and "report.activation_bits=8" in rows[2]
    assert rows[3].startswith("| CoDeQ (base weight_decay=0, dz lr=0.01, dz weight_decay=2) |")


def test_csv_and_latex_hold_the_table(table_runs, tmp_path, capsys):
    code, out, _ = compare(capsys, table_runs, "--csv", tmp_path / "out" / "table.csv", "--latex",
                           tmp_path / "table.tex")
    assert code == 0 and f"wrote {tmp_path / 'out' / 'table.csv'}" in out
    rows = list(csv.DictReader((tmp_path / "out" / "table.csv").open()))
    assert [row["n"] for row in rows] == ["1", "3", "1", "2"]
    fp32, seeds = rows[0], rows[1]
    assert (fp32["method"], fp32["weights"], fp32["pruning"], fp32["acc_std"], fp32["sparsity_mean"]) == \
        ("FP32 baseline", "32-bit", "None", "", "")
    assert (seeds["method"], seeds["setting"], seeds["epochs"], seeds["activation_bits"]) == \
        ("CoDeQ", "dz_l2 λ=0.01", "2", "32")
    assert float(seeds["acc_mean"]) == pytest.approx(92.0) and float(seeds["acc_std"]) == pytest.approx(2.0)
    assert float(seeds["rel_bops_std"]) == pytest.approx(0.1) and float(seeds["sparsity_mean"]) == pytest.approx(72)
    assert seeds["runs"].split(";") == [str(run) for run in table_runs[1:4]]
    assert (tmp_path / "table.tex").read_text().splitlines() == [
        r"\begin{tabular}{lllrrr}",
        r"\toprule",
        r"Method & Weights & Pruning & Acc (\%) & Rel. BOPs (\%) & $n$ \\",
        r"\midrule",
        r"FP32 baseline & 32-bit & None & $95.00$ & $100.00$ & 1 \\",
        r"CoDeQ (dz\_l2 $\lambda$=0.01) & 4-bit & Unstruc. & $92.00 \pm 2.00$ & $3.00 \pm 0.10$ & 3 \\",
        r"CoDeQ (dz\_l2 $\lambda$=0.1) & 4-bit & Unstruc. & $80.00$ & $1.00$ & 1 \\",
        r"CoDeQ & MP & Unstruc. & $92.00 \pm 1.41$ & $2.60 \pm 0.14$ & 2 \\",
        r"\bottomrule",
        r"\end{tabular}",
    ]


def test_figures_are_png_or_pdf_by_suffix_and_both_without_one(table_runs, tmp_path, capsys):
    code, out, _ = compare(capsys, table_runs, "--plot", tmp_path / "pareto", "--plot-epochs",
                           tmp_path / "epochs.pdf")
    assert code == 0
    written = [tmp_path / "pareto.png", tmp_path / "pareto.pdf", tmp_path / "epochs.pdf"]
    assert [line for line in out.splitlines() if line.startswith("wrote")] == [f"wrote {path}" for path in written]
    png = written[0].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
    for pdf in written[1:]:
        content = pdf.read_bytes()
        assert content.startswith(b"%PDF-") and content.rstrip().endswith(b"%%EOF") and len(content) > 5_000
    import matplotlib.image

    image = matplotlib.image.imread(written[0])
    assert image.shape[1] > 800 and image[..., :3].std() > 0.05


def test_a_bad_figure_suffix_is_refused_before_anything_is_written(table_runs, tmp_path, capsys):
    code, out, err = compare(capsys, table_runs, "--csv", tmp_path / "t.csv", "--plot", tmp_path / "p.jpg")
    assert code == 2 and out == ""
    assert err == f"report error: --plot {tmp_path / 'p.jpg'}: a figure is written as .png or .pdf (no suffix: both)\n"
    assert not (tmp_path / "t.csv").exists()


def test_epoch_figure_needs_a_quantized_run_and_outputs_need_compare(table_runs, tmp_path, capsys):
    code, _, err = compare(capsys, table_runs[:1], "--plot-epochs", tmp_path / "e.png")
    assert code == 2 and "none of these runs logs sparsity (FP32 runs only)" in err
    assert cli.main(["report", str(table_runs[1]), "--csv", str(tmp_path / "t.csv")]) == 2
    assert capsys.readouterr().err == "report error: --csv go with --compare\n"


def test_an_unfinished_run_is_named_and_a_run_without_an_epoch_is_refused(tmp_path, capsys):
    run = make_run(tmp_path, "cut", (0.9, 0.03, 0.7), epochs=2)
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "epochs": 5}))
    code, out, _ = compare(capsys, [run])
    assert code == 0 and f"note: {run} stopped at epoch 2 of 5; its last logged epoch is used" in out
    (run / "metrics.jsonl").write_text("")
    code, _, err = compare(capsys, [run])
    assert code == 2 and err == f"report error: {run} has no finished epoch in metrics.jsonl: nothing to compare yet\n"


def group(accuracy, bops):
    return Group([RunResult(None, {"quantizer": None}, [{"epoch": 1, "val_acc": accuracy / 100}], bops / 100)])


def test_the_pareto_front_keeps_the_groups_no_other_beats_in_both():
    groups = [group(90, 3), group(91, 5), group(89, 4), group(95, 100), group(85, 1), group(91, 6)]
    assert [(g.accuracy.mean, g.rel_bops.mean) for g in pareto_front(groups)] == \
        [pytest.approx((85, 1)), pytest.approx((90, 3)), pytest.approx((91, 5)), pytest.approx((95, 100))]
