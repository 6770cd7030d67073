"""bench/inference.py runs end to end on small settings: three ONNX files per run, five sessions, sizes, times.
(Speed itself is judged from its full run in docs/deployment.md, not here.)"""
import json
import re
import subprocess
import sys

from codeq.app import cli
from conftest import quick_config, write_config


def test_inference_bench_writes_times_and_tabulates_three_files_per_run(root, tmp_path):
    assert cli.main(["train", "--config", str(write_config(tmp_path, quick_config(tmp_path, model="mlp")))]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    done = subprocess.run([sys.executable, "bench/inference.py", str(run_dir), "--threads", "1", "--repeats", "3",
                           "--batches", "1,4", "--out-dir", str(tmp_path / "onnx"), "--json", str(tmp_path / "x.json")],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "x.json").read_text())
    assert result["threads"] == 1 and result["batches"] == [1, 4] and "onnxruntime 1." in result["machine"]
    variants = result["runs"][run_dir.name]
    assert list(variants) == ["FP32", "CoDeQ", "CoDeQ, decoded at load", "CoDeQ slim", "CoDeQ slim, decoded at load"]
    for entry in variants.values():
        assert all(len(entry["seconds"][batch]) == 3 and entry["median_s"][batch] > 0 for batch in ("1", "4"))
    assert [entry["decode_at_load"] for entry in variants.values()] == [False, False, True, False, True]
    assert variants["CoDeQ"]["bytes"] < variants["FP32"]["bytes"] / 4
    assert variants["CoDeQ"]["macs"] == variants["FP32"]["macs"] == 3 * 16 * 16 * 256 + 256 * 256 + 256 * 10
    assert variants["CoDeQ slim"]["macs"] <= variants["CoDeQ"]["macs"]
    lines = done.stdout.strip().splitlines()
    assert lines[0] == result["machine"] and "1 intra-op threads, median of 3 repeats" in lines[0]
    assert sum(line.startswith(f"| {run_dir.name} | ") for line in lines) == 5
    slim = variants["CoDeQ slim, decoded at load"]["median_s"]["4"] / variants["FP32"]["median_s"]["4"]
    assert re.fullmatch(rf"slimmed CoDeQ \(decoded at load\) / FP32 latency at batch 4: {slim:.3f} \({run_dir.name}\)",
                        lines[-1])
