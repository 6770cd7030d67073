"""CoDeQ in PyTorch Lightning: a LightningModule quantizes its network with `codeq`, a Callback re-estimates its
BatchNorm statistics before each validation; after `fit`, `codeq` reports, converts and exports.

    python examples/lightning_module.py [--epochs 8] [--out lightning_module.onnx]
"""
import argparse

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import codeq


class DigitsClassifier(L.LightningModule):
    def __init__(self, lr: float = 3e-3, dz_decay: float = 6.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                   nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                                   nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(256, 10))
        # 4-bit weights with learned dead zones; the norms stay FP32.
        codeq.prepare(self.model, "deadzone", {"fixed_bit_val": 4, "learnable_bit": False},
                      exclude_layers=["type:BatchNorm2d"])
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        with codeq.quantized_step(self):  # each weight quantized once per step; Lightning runs backward after it
            loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        with codeq.quantized_step(self):
            self.log("val_acc", (self(images).argmax(1) == labels).float().mean())

    def on_validation_epoch_end(self) -> None:
        report = codeq.compression_report(self, self.example_input_array)
        self.log_dict({"sparsity": report["sparsity"], "rel_bops": report["rel_bops"]})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # The dz group's weight decay is the sparsity knob.
        return torch.optim.AdamW(codeq.param_groups(self, base={"lr": self.hparams.lr},
                                                    dz={"lr": self.hparams.lr, "weight_decay": self.hparams.dz_decay}))


class RecalibrateBatchNorm(L.Callback):
    """BatchNorm's running statistics lag the weights the dead zone changes every step: re-estimate them with the
    current quantized weights before each validation (training uses batch statistics, so it is not affected)."""

    def on_validation_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        codeq.recalibrate_bn(module, trainer.train_dataloader, batches=5)


def main(epochs: int = 8, out: str = "lightning_module.onnx") -> dict:
    L.seed_everything(0, verbose=False)
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16  # [1797, 1, 8, 8]
    labels = torch.tensor(digits.target)
    train = DataLoader(TensorDataset(images[:1500], labels[:1500]), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(images[1500:], labels[1500:]), batch_size=300)
    module = DigitsClassifier()
    before = codeq.compression_report(module, module.example_input_array)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=[RecalibrateBatchNorm()],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, train, val)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    report = codeq.compression_report(module, module.example_input_array)
    print(f"val accuracy {metrics['val_acc']:.1%}, sparsity {before['sparsity']:.1%} -> {report['sparsity']:.1%}, "
          f"Rel. BOPs {report['rel_bops']:.2%}, {report['fp32_bytes']:,} B -> {report['size_bytes']:,} B")
    plain = codeq.convert(module.model)  # an ordinary nn.Sequential holding the quantized weights
    exported = codeq.export_onnx(module.model, images[0], out)  # INT4 codes, checked with onnxruntime
    print("\n".join(exported.lines()))
    return {"module": module, "plain": plain, "images": images[1500:], "metrics": metrics, "before": before,
            "report": report, "export": exported}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", default="lightning_module.onnx")
    arguments = parser.parse_args()
    main(arguments.epochs, arguments.out)
