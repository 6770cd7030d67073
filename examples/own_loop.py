"""CoDeQ in a plain PyTorch loop: your model, your data, your loop; `codeq` compresses, reports, converts, exports.

    python examples/own_loop.py [--epochs 8] [--out own_loop.onnx]
"""
import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import codeq


def main(epochs: int = 8, out: str = "own_loop.onnx") -> dict:
    torch.manual_seed(0)
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16  # [1797, 1, 8, 8]
    labels = torch.tensor(digits.target)
    model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(256, 10))
    # 4-bit weights with learned dead zones; the norms stay FP32. The dz weight decay is the sparsity knob.
    codeq.prepare(model, "deadzone", {"fixed_bit_val": 4, "learnable_bit": False}, exclude_layers=["type:BatchNorm2d"])
    optimizer = torch.optim.AdamW(codeq.param_groups(model, base={"lr": 3e-3}, dz={"lr": 3e-3, "weight_decay": 6.0}))
    before = codeq.compression_report(model, images[0])
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(labels)).split(64):
            with codeq.quantized_step(model):  # each weight quantized once per step
                loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    # BatchNorm's running statistics lag weights the dead zone changes every step: re-estimate them once at the end.
    codeq.recalibrate_bn(model, [images[batch] for batch in torch.randperm(len(labels)).split(64)], batches=5)
    model.eval()
    with torch.no_grad(), codeq.quantized_step(model):
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    report = codeq.compression_report(model, images[0])
    print(f"accuracy {accuracy:.1%}, sparsity {before['sparsity']:.1%} -> {report['sparsity']:.1%}, "
          f"Rel. BOPs {report['rel_bops']:.2%}, {report['fp32_bytes']:,} B -> {report['size_bytes']:,} B")
    plain = codeq.convert(model)  # an ordinary nn.Module holding the quantized weights
    exported = codeq.export_onnx(model, images[0], out)  # INT4 codes, checked with onnxruntime before writing
    print("\n".join(exported.lines()))
    return {"model": model, "plain": plain, "images": images, "accuracy": accuracy, "before": before,
            "report": report, "export": exported}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", default="own_loop.onnx")
    arguments = parser.parse_args()
    main(arguments.epochs, arguments.out)
