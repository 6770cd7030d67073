"""bench/paper_mini.py (`make paper-mini`) end to end on a cut-down protocol: its sweeps run, and the document it writes
holds the table of those runs, valid figures, the machine and the wall time."""
import csv
import subprocess
import sys

import yaml

from conftest import ROOT

MINI = ROOT / "configs" / "paper_mini"


def test_paper_mini_writes_its_document_from_the_runs_it_made(tmp_path):
    main = tmp_path / "main.yaml"
    main.write_text(yaml.safe_dump({"configs": [str(MINI / "resnet20_digits_4bit.yaml"),
                                                str(MINI / "resnet20_digits_mp.yaml")],
                                    "grid": {"seed": [0, 1]}, "name": "mini"}))
    strong = tmp_path / "strong.yaml"
    strong.write_text(yaml.safe_dump({"configs": [str(MINI / "resnet20_digits_4bit.yaml")],
                                      "grid": {"loss_terms.0.lambda": [1.0]}, "name": "mini_lambda"}))
    doc, save_dir = tmp_path / "docs" / "mini.md", tmp_path / "runs"
    command = [sys.executable, "bench/paper_mini.py", "--fresh", "--epochs", "1", "--save-dir", str(save_dir),
               "--doc", str(doc), "--sweeps", str(main), str(strong)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith(f"paper-mini: wrote {doc} and {doc.with_suffix('')}/ in ")
    text = doc.read_text()
    assert "| CoDeQ (dz_l2 λ=0.01) | 4-bit | Unstruc. |" in text and "| 2 |" in text
    assert "| CoDeQ | MP | Unstruc. |" in text and "| CoDeQ (dz_l2 λ=1) | 4-bit | Unstruc. |" in text
    assert "5 runs, of which 0 had finished before this call" in text and "wall time" in text
    assert f"command: `python bench/paper_mini.py --fresh --epochs 1 --save-dir {save_dir}" in text
    for name in ("pareto", "epochs", "layers"):
        assert f"](mini/{name}.png)" in text
        assert (doc.parent / "mini" / f"{name}.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    rows = list(csv.DictReader((doc.parent / "mini" / "table.csv").open()))
    assert [(row["weights"], row["n"]) for row in rows] == [("4-bit", "2"), ("MP", "2"), ("4-bit", "1")]
    # A second call without --fresh trains nothing: every run has finished.
    done = subprocess.run(command[:2] + command[3:], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "5 runs, of which 5 had finished before this call" in doc.read_text()
    assert "0 trained, 4 skipped (finished before)" in done.stdout
