"""The benchmarks run end to end on small settings: their JSON holds every timing, their last line the worst ratio.
(Speed itself is judged from their full runs in docs/benchmarks.md, not here.)"""
import json
import re
import subprocess
import sys


def run_bench(root, script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, f"bench/{script}", "--threads", "1", *args], cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_step_overhead_times_every_variant_and_ends_with_the_worst_ratio(root, tmp_path):
    out = run_bench(root, "step_overhead.py", "--models", "resnet20", "--repeats", "3", "--val-batches", "2",
                    "--control", "--reference", "--json", str(tmp_path / "steps.json"))
    result = json.loads((tmp_path / "steps.json").read_text())["models"]["resnet20"]
    assert result["batch_size"] == 128 and result["quantized_weights"] == 268_336
    ratios = {}
    for phase in ("train", "val"):
        entry = result[phase]
        for key in ("fp32", "qat_learnable", "qat_fixed", "fp32_copy", "qat_learnable_plain", "qat_fixed_plain"):
            assert len(entry[f"{key}_s"]) == 3 and all(seconds > 0 for seconds in entry[f"{key}_s"])
        for bits in ("learnable", "fixed"):
            key = f"qat_{bits}"
            assert entry[f"{key}_ratio_low"] <= entry[f"{key}_ratio"] <= entry[f"{key}_ratio_high"]
            assert 0 < entry[f"{key}_quantizer_share"]
            ratios[f"{phase} {bits}"] = entry[f"{key}_ratio"]
    for bits in ("learnable", "fixed"):
        assert len(result[f"qat_{bits}_recalibration_s"]) == 3 and result[f"qat_{bits}_recalibration_train_steps"] > 0
        assert f"BatchNorm re-estimation ({bits} bits, 5 batches)" in out
    worst = re.fullmatch(r"worst QAT/FP32 ratio: (\d+\.\d{3}) \(resnet20 (train|val) (learnable|fixed) bits\)",
                         out.splitlines()[-1])
    assert worst and float(worst[1]) == round(max(ratios.values()), 3)
    assert ratios[f"{worst[2]} {worst[3]}"] == max(ratios.values())


def test_absmax_times_sizes_and_whole_models(root, tmp_path):
    out = run_bench(root, "absmax.py", "--sizes", "1e3,2e4", "--models", "resnet20", "--repeats", "2",
                    "--reference-up-to", "1e3", "--json", str(tmp_path / "absmax.json"))
    report = json.loads((tmp_path / "absmax.json").read_text())
    assert set(report["results"]) == {"1000", "20000"}
    assert "kthvalue" in report["results"]["1000"]["median_s"]
    assert "kthvalue" not in report["results"]["20000"]["median_s"]
    model = report["models"]["resnet20"]
    assert model["layers"] == 20 and model["elements"] == 268_336
    assert set(model["median_s"]) == {"together", "per_layer", "max"}
    worst = max([r["vs_max"] for r in report["results"].values()] + [model["vs_max"]])
    assert out.splitlines()[-1].startswith(f"worst robust_absmax / max ratio: {worst:.1f} (")


def test_unknown_model_is_a_one_line_usage_error(root):
    for script in ("step_overhead.py", "absmax.py"):
        done = subprocess.run([sys.executable, f"bench/{script}", "--models", "resnet20,resnet99"], cwd=root,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and not done.stdout
        assert done.stderr.splitlines()[-1].endswith("unknown model 'resnet99': choose from resnet20, resnet18, vit, "
                                                     "or none")


def test_target_quality_trains_its_runs_and_writes_the_doc_section_and_figure(root, tmp_path):
    doc = tmp_path / "budget.md"
    doc.write_text("# before\n<!-- target-quality:start -->\nold\n<!-- target-quality:end -->\nafter\n")
    done = subprocess.run([sys.executable, "bench/target_quality.py", "--epochs", "1", "--img-size", "8", "--sweep",
                           "4,9", "--targets", "0.3", "--seeds", "0", "--variants", "4-bit", "--save-dir",
                           str(tmp_path / "runs"), "--doc", str(doc), "--figure", str(tmp_path / "quality.png")],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert [(run["kind"], run["knob"]) for run in runs] == [("sweep", 4), ("sweep", 9), ("target", 0.3)]
    assert all(0 <= run["sparsity"] < 1 and 0 < run["val_acc"] <= 1 for run in runs)
    text = doc.read_text()
    assert text.startswith("# before\n<!-- target-quality:start -->\nMeasured with `python bench/target_quality.py")
    assert text.endswith("<!-- target-quality:end -->\nafter\n") and "old" not in text
    sweep = sorted((run for run in runs if run["kind"] == "sweep"), key=lambda run: run["sparsity"])
    target = runs[-1]
    better = [run for run in sweep if run["sparsity"] >= target["sparsity"]]
    verdict = ("none reaches it" if not better else
               "yes" if target["val_acc"] >= max(run["val_acc"] for run in better) else "**no**")
    assert f"| 4-bit | 0.3 | {target['sparsity']:.4f} | {target['val_acc']:.2%} | " in text and verdict in text
    assert (tmp_path / "quality.png").stat().st_size > 10_000
