# Every target creates the virtual environment on first use.
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: quickstart test bench reference clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

quickstart: $(STAMP)
	rm -rf runs/quickstart
	$(PYTHON) run_training.py --config configs/quickstart.yaml

test: $(STAMP)
	$(PYTHON) -m pytest -q

bench: $(STAMP)  # the CPU figures of docs/benchmarks.md, ~16 min on 2 cores; run it on an otherwise idle machine
	$(PYTHON) bench/absmax.py --repeats 20
	$(PYTHON) bench/step_overhead.py --models resnet20 --repeats 60 --control
	$(PYTHON) bench/step_overhead.py --models resnet18,vit --repeats 20

reference: $(STAMP)  # regenerate README.md's YAML reference from the schema
	$(PYTHON) -m src.config --write README.md

clean:
	rm -rf runs wandb .pytest_cache
