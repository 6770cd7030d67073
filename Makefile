# Every target creates the virtual environment on first use.
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: quickstart test bench bench-gpu paper-mini reference clean

# The package itself, editable, with every extra and the dev tools, at the versions of constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

quickstart: $(STAMP)
	rm -rf runs/quickstart
	$(VENV)/bin/codeq train --config configs/quickstart.yaml

test: $(STAMP)  # lint (ruff.toml), then the tests
	$(VENV)/bin/ruff check .
	$(PYTHON) -m pytest -q

# The CPU figures of docs/benchmarks.md and docs/deployment.md, ~35 min on 2 cores; run it on an otherwise idle machine.
# step_overhead times QAT with learnable and with fixed bit-widths beside FP32 and an identical FP32 copy (noise).
# The inference benchmark trains its two runs first (once: --resume auto leaves a finished run as it is).
BENCH_RUN := -m codeq train --set save_dir=runs/bench --resume auto
bench: $(STAMP)
	$(PYTHON) bench/absmax.py --repeats 20
	$(PYTHON) bench/step_overhead.py --models resnet20 --repeats 60 --control --reference --json runs/bench/resnet20.json
	$(PYTHON) bench/step_overhead.py --models resnet18,vit --repeats 20 --control --json runs/bench/resnet18_vit.json
	$(PYTHON) bench/step_overhead.py --models resnet20 --repeats 30 --compile --control --json runs/bench/resnet20_compiled.json
	$(PYTHON) $(BENCH_RUN) --config configs/quickstart.yaml --set run_name=quickstart
	$(PYTHON) $(BENCH_RUN) --config configs/quickstart_group_lasso.yaml --set run_name=group_lasso
	$(PYTHON) bench/inference.py runs/bench/quickstart runs/bench/group_lasso --threads 1 --repeats 40 \
		--json runs/bench/inference_1thread.json
	$(PYTHON) bench/inference.py runs/bench/quickstart runs/bench/group_lasso --threads 2 --repeats 40 \
		--json runs/bench/inference_2threads.json

# The GPU checks and figures of docs/benchmarks.md, on one CUDA device: its tests, then the percentile and the
# compiled bf16 channels-last ResNet-20 step (the 1.15 target), with torch.compile's default mode and with CUDA graphs.
GPU_STEPS := bench/step_overhead.py --device cuda --models resnet20 --repeats 30 --train-steps 20 --val-batches 20 \
	--amp bf16 --channels-last --compile
bench-gpu: $(STAMP)
	$(PYTHON) -m pytest -q tests/test_cuda.py tests/test_device_data.py
	$(PYTHON) bench/absmax.py --device cuda --repeats 20 --json runs/bench/absmax_cuda.json
	$(PYTHON) $(GPU_STEPS) --json runs/bench/resnet20_cuda.json
	$(PYTHON) $(GPU_STEPS) --compile-mode reduce-overhead --json runs/bench/resnet20_cuda_graphs.json

# The paper's protocol in miniature on digits (bench/paper_mini.py), ~15 min on an idle 2-core machine: writes
# docs/paper-mini.md and docs/paper-mini/ from fresh runs in runs/paper_mini. A quick check of the whole pipeline:
#   make paper-mini PAPER_MINI_ARGS="--epochs 1 --save-dir /tmp/paper_mini --doc /tmp/paper_mini/paper-mini.md"
paper-mini: $(STAMP)
	$(PYTHON) bench/paper_mini.py --fresh $(PAPER_MINI_ARGS)

reference: $(STAMP)  # regenerate README.md's YAML reference from the schema
	$(PYTHON) -m codeq.app.config --write README.md

clean:
	rm -rf runs wandb .pytest_cache
