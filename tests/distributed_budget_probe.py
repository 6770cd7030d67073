"""Run by tests/test_budget_runs.py under torchrun: every process measures a different value and passes it to its
``BudgetController``, synchronised as the trainer does (rank 0's value, broadcast); each saves the pressures it set.

    torchrun --nproc-per-node=2 tests/distributed_budget_probe.py OUT_DIR
"""
import functools
import json
import sys
from pathlib import Path

import torch
from torch import nn

import codeq
from codeq.training import distributed


def main(out_dir: str) -> None:
    device = distributed.setup(torch.device("cpu"))
    rank = distributed.rank()
    torch.manual_seed(0)
    model = codeq.prepare(nn.Sequential(nn.Linear(16, 16)), "deadzone", {"fixed_bit_val": 4, "learnable_bit": False})
    optimizer = torch.optim.AdamW(codeq.param_groups(model, base={"lr": 1e-4}, dz={"lr": 1e-4, "weight_decay": 1.0}))
    budget = codeq.BudgetController(model, 40, optimizer, sparsity=0.5, interval=1, ramp=0.0,
                                    sync=functools.partial(distributed.broadcast_value, device=device))
    pressures = []
    for _ in range(40):
        budget.step(0.2 + 0.6 * rank)  # rank 0 is behind the target, rank 1 past it
        pressures.append(budget.pressure_values()["dz.weight_decay"])
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(pressures))
    distributed.teardown(finished=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
