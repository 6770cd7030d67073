"""CoDeQ in a Hugging Face `Trainer`: a small BERT built from its config (no download) learns whether token 1 occurs
more often than token 2 in a random sequence; `codeq` quantizes its Linear layers, reports, converts and exports.

    python examples/hf_trainer.py [--steps 250] [--out hf_trainer.onnx]
"""
import argparse
import tempfile

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import codeq

VOCAB = 8  # token 0 is [CLS], tokens 1..7 fill the sequences

class CodeqTrainer(Trainer):
    """The Trainer with its optimizer over codeq's groups and each forward quantized once per step."""

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            # The Trainer's own split (no decay for biases and LayerNorms); codeq moves the dead-zone logits out of it.
            decay = set(self.get_decay_parameter_names(self.model))
            trained = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
            groups = [{"params": [p for name, p in trained if name in decay], "weight_decay": self.args.weight_decay},
                      {"params": [p for name, p in trained if name not in decay], "weight_decay": 0.0}]
            optimizer_cls, options = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            dz = {"lr": self.args.learning_rate, "weight_decay": 6.0}  # the sparsity knob
            self.optimizer = optimizer_cls(codeq.param_groups(self.model, base=groups, dz=dz), **options)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with codeq.quantized_step(model):  # backward runs after the block, as in any loop
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class Logits(nn.Module):
    """What ONNX exports: one tensor in (token ids [N, 25]), one tensor out (logits [N, 2])."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits


def make_data(count: int, length: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` sequences [CLS=0, t_1 .. t_length] of random tokens 1..VOCAB-1, labelled 1 where token 1 occurs more
    often than token 2 (sequences where they tie are dropped, so a few fewer than ``count`` remain)."""
    tokens = torch.randint(1, VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))
    ones, twos = (tokens == 1).sum(1), (tokens == 2).sum(1)
    tokens, labels = tokens[ones != twos], (ones > twos)[ones != twos].long()
    return torch.cat([torch.zeros(len(tokens), 1, dtype=torch.long), tokens], 1), labels


def main(steps: int = 250, out: str = "hf_trainer.onnx") -> dict:
    torch.manual_seed(0)
    tokens, labels = make_data(6000)  # ~5000 sequences [25]: ~4000 to train on, the rest to test
    train = [{"input_ids": ids, "labels": label} for ids, label in zip(tokens[:4000], labels[:4000])]
    test, test_labels = tokens[4000:], labels[4000:]
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=tokens.shape[1], num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config)
    # 4-bit Linear weights (the classifier too) with learned dead zones; embeddings and LayerNorms stay FP32.
    codeq.prepare(model, "deadzone", {"fixed_bit_val": 4, "learnable_bit": False},
                  exclude_layers=["type:Embedding", "type:LayerNorm"])
    before = codeq.compression_report(model, tokens[0])  # one item: 25 token ids
    with tempfile.TemporaryDirectory() as output_dir:
        arguments = TrainingArguments(output_dir, max_steps=steps, per_device_train_batch_size=32, learning_rate=2e-3,
                                      weight_decay=0.01, warmup_steps=steps // 10, save_strategy="no", report_to=[],
                                      use_cpu=True, logging_steps=max(steps // 3, 1), disable_tqdm=True, seed=0)
        CodeqTrainer(model=model, args=arguments, train_dataset=train).train()
    model.eval()
    with torch.no_grad(), codeq.quantized_step(model):
        accuracy = (model(input_ids=test).logits.argmax(1) == test_labels).float().mean().item()
    report = codeq.compression_report(model, tokens[0])
    print(f"accuracy {accuracy:.1%}, sparsity {before['sparsity']:.1%} -> {report['sparsity']:.1%}, "
          f"Rel. BOPs {report['rel_bops']:.2%}, {report['fp32_bytes']:,} B -> {report['size_bytes']:,} B")
    plain = codeq.convert(model)  # a BertForSequenceClassification holding the quantized weights
    exported = codeq.export_onnx(Logits(model), tokens[0], out)  # int64 ids in, logits out; checked with onnxruntime
    print("\n".join(exported.lines()))
    return {"model": model, "plain": plain, "tokens": test, "accuracy": accuracy, "before": before,
            "report": report, "export": exported}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--out", default="hf_trainer.onnx")
    arguments = parser.parse_args()
    main(arguments.steps, arguments.out)
