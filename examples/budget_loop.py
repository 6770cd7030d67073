"""A compression budget in a plain PyTorch loop: the model ends 90 % sparse, whatever the dz weight decay it starts
from; `codeq.BudgetController` adjusts that decay after every optimizer step.

    python examples/budget_loop.py [--epochs 10] [--sparsity 0.9]
"""
import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import codeq


def main(epochs: int = 10, sparsity: float = 0.9) -> dict:
    torch.manual_seed(0)
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).flatten(1) / 16  # [1797, 64]
    labels = torch.tensor(digits.target)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    codeq.prepare(model, "deadzone", {"fixed_bit_val": 4, "learnable_bit": False})
    optimizer = torch.optim.AdamW(codeq.param_groups(model, base={"lr": 3e-3}, dz={"lr": 3e-3, "weight_decay": 6.0}))
    steps = epochs * len(torch.randperm(len(labels)).split(64))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    # The budget instead of a fixed pressure: the dz group's weight decay above is only where it starts.
    budget = codeq.BudgetController(model, total_steps=steps, optimizer=optimizer, sparsity=sparsity)
    for _ in range(epochs):
        for batch in torch.randperm(len(labels)).split(64):
            with codeq.quantized_step(model):
                loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            budget.step()  # measures the model every few steps and sets the dz weight decay
    print(f"sparsity {budget.achieved:.4f} (target {sparsity}), dz weight decay {budget.pressure_values()}")
    print(budget.verdict() or "budget met")  # None when met, else what was reached and why not more
    model.eval()
    with torch.no_grad(), codeq.quantized_step(model):
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    return {"model": model, "images": images, "budget": budget, "accuracy": accuracy, "steps": steps}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--sparsity", type=float, default=0.9)
    arguments = parser.parse_args()
    main(arguments.epochs, arguments.sparsity)
