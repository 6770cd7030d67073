"""Compression metrics against hand-computed MACs, BOPs, structured BOPs and sizes."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from codeq.attach import attach_weight_quantizers
from codeq.channels import KEEP_LIVE, KEEP_OUTPUT, KEEP_PADDED
from codeq.compression import (
    BopsSettings,
    CompressionMonitor,
    count_macs,
    layer_stats,
    model_size,
    quantized_layer_bytes,
    structured_macs,
    summary,
)
from codeq.export.slim import slim_model
from codeq.models import create_model
from codeq.quantizers import DeadZoneLDZCompander


class KeepFirst(nn.Module):
    """Test quantizer: keeps the first ``keep`` weights (flattened order), zeroes the rest, reports ``bits``."""

    def __init__(self, keep: int, bits: int) -> None:
        super().__init__()
        self.keep, self.bits = keep, bits

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(weight.numel(), dtype=weight.dtype)
        mask[: self.keep] = 1
        return weight * mask.view_as(weight)

    def stats(self, weight: torch.Tensor) -> dict[str, float]:
        return {"bits": float(self.bits), "deadzone": 0.0, "step": 1.0}


def test_resnet20_dense_macs_match_the_published_count():
    model = create_model("resnet20", num_classes=10, img_size=32)
    macs = count_macs(model, torch.zeros(3, 32, 32))
    assert sum(macs.values()) == 40_551_040
    assert macs["conv1"] == 3 * 16 * 9 * 32 * 32 and macs["fc"] == 64 * 10
    attach_weight_quantizers(model, ["bn"], DeadZoneLDZCompander, {})
    assert sum(count_macs(model, torch.zeros(3, 32, 32)).values()) == 40_551_040


def test_vit_tiny_macs_count_patch_embedding_attention_projections_and_mlps():
    model = create_model("vit", num_classes=1000, img_size=224)
    macs = count_macs(model, torch.zeros(3, 224, 224))
    tokens, width, hidden, blocks = 197, 192, 768, 12
    assert macs["patch_embed.proj"] == 3 * width * 16 * 16 * 14 * 14
    assert macs["blocks.0.attn.qkv"] == tokens * width * 3 * width
    assert macs["blocks.11.attn.proj"] == tokens * width * width
    assert macs["blocks.5.mlp.fc1"] == macs["blocks.5.mlp.fc2"] == tokens * width * hidden
    assert macs["head"] == width * 1000  # the classifier sees the class token only
    per_block = tokens * width * (3 * width + width + 2 * hidden)
    assert sum(macs.values()) == 3 * width * 256 * 196 + blocks * per_block + width * 1000 == 1_074_851_328


def test_count_macs_leaves_mode_and_batchnorm_statistics_alone():
    model = create_model("resnet20", num_classes=10, img_size=16).train()
    before = model.bn1.running_mean.clone()
    count_macs(model, torch.randn(3, 16, 16) + 5)
    assert model.training and torch.equal(model.bn1.running_mean, before)


def hand_model() -> nn.Module:
    """Conv 2->4 (3x3, 8x8 output) quantized by KeepFirst(18, 3 bits), then an FP32 Linear 256->10."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
    attach_weight_quantizers(model, ["3"], KeepFirst, {"keep": 18, "bits": 3})
    with torch.no_grad():
        model[3].weight.view(-1)[:256] = 0  # row 0 of the Linear: density 0.9, one null output
    return model


def test_hand_built_layers_give_hand_computed_bops():
    model = hand_model()
    macs = count_macs(model, torch.zeros(2, 8, 8))
    assert macs == {"0": 2 * 4 * 9 * 64, "3": 256 * 10}
    stats = {s.name: s for s in layer_stats(model, macs)}
    conv, linear = stats["0"], stats["3"]
    assert (conv.quantized, conv.bits, conv.nonzero, conv.numel) == (True, 3.0, 18, 72)
    assert (linear.quantized, linear.bits, linear.nonzero, linear.deadzone) == (False, 32.0, 2304, None)
    assert conv.bops == 0.25 * 4608 * 3 * 32 == 110_592
    assert linear.bops == pytest.approx(0.9 * 2560 * 32 * 32)
    totals = summary(list(stats.values()))
    assert totals["rel_bops"] == pytest.approx((110_592 + 2_359_296) / ((4608 + 2560) * 1024))
    assert totals["sparsity"] == 0.75 and totals["mean_bits"] == 3.0
    assert "rel_bops_structured" not in totals


def test_structured_bops_credit_null_output_channels_and_the_inputs_they_null_downstream():
    model = hand_model()
    macs = count_macs(model, torch.zeros(2, 8, 8))
    kept = structured_macs(model, torch.zeros(2, 8, 8), macs)
    # Conv keeps output channel 0 only, so the Linear reads its 64 features; the Linear's zero row 0 is a network
    # output and stays.
    assert kept == {"0": 2 * 1 * 9 * 64, "3": 64 * 10}
    totals = summary(layer_stats(model, macs, kept))
    assert totals["rel_bops_structured"] == pytest.approx((1152 * 3 * 32 + 640 * 32 * 32) / ((4608 + 2560) * 1024))
    slim = slim_model(model, torch.zeros(2, 8, 8))
    assert slim.macs[1] == sum(kept.values()) and slim.kept == {KEEP_OUTPUT: ["3[0]"]}


class TinyResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.head = nn.Conv2d(4, 2, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        y = self.conv2(F.relu(self.bn1(self.conv1(x))))
        return self.head(F.relu(x + y))


def test_structured_column_counts_what_slim_removes_at_a_residual_addition():
    model = TinyResidual().eval()
    with torch.no_grad():
        model.stem.weight[1] = 0  # null in both operands of the sum: stem row 1 and conv2 row 1 go
        model.conv1.weight[2] = 0  # BatchNorm turns it into the constant 0.7, which a padded conv2 cannot fold
        model.bn1.bias.fill_(0.7)
        model.conv2.weight[[1, 3]] = 0  # channel 3 is null in the branch only; the skip keeps it live
    example = torch.zeros(3, 8, 8)
    macs = count_macs(model, example)
    kept = structured_macs(model, example, macs)
    assert kept == {"stem": 3 * 3 * 9 * 64, "conv1": 4 * 3 * 9 * 64, "conv2": 3 * 4 * 9 * 64, "head": 2 * 3 * 64}
    slim = slim_model(model, example)
    assert slim.macs == (sum(macs.values()), sum(kept.values()))
    assert slim.kept == {KEEP_PADDED: ["conv1[2]"], KEEP_LIVE: ["conv2[3]"]}


def test_a_null_row_whose_stream_channel_lives_on_stays_in_the_report_as_in_slim():
    model = create_model("resnet20", num_classes=10, img_size=16).eval()
    with torch.no_grad():
        # Stage 2 pads channels 0-7 and 24-31 with zeros on the shortcut; channel 10 carries stage 1. Channel 0 of
        # the stream is 0 after layer2.0, but layer2.1 adds its live conv2 channel 0 to it.
        model.layer2[0].conv2.weight[[0, 10]] = 0
    example = torch.zeros(3, 16, 16)
    macs = count_macs(model, example)
    assert structured_macs(model, example, macs) == macs
    assert slim_model(model, example).kept == {KEEP_LIVE: ["layer2.0.conv2[0]", "layer2.0.conv2[10]"]}


def test_structured_column_on_vit_attention_mlp_and_layer_norm():
    model = create_model("vit", num_classes=10, img_size=32).eval()
    width, hidden = 192, 768
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[5] = 0
        model.blocks[0].mlp.fc1.bias[5] = 0.3  # a constant through GELU, folded into fc2's bias: it goes
        model.blocks[0].attn.qkv.weight[2 * width + 7] = 0  # a value channel: attention mixes, it stays
        model.blocks[0].mlp.fc2.weight[3] = 0  # residual stream channel 3 stays live through the skip
        model.blocks[1].norm1.weight[4] = 0
        model.blocks[1].norm1.bias[4] = 0
    example = torch.zeros(3, 32, 32)
    macs = count_macs(model, example)
    kept = structured_macs(model, example, macs)
    assert kept["blocks.0.mlp.fc1"] == kept["blocks.0.mlp.fc2"] == macs["blocks.0.mlp.fc1"] * (hidden - 1) // hidden
    assert {name for name in macs if kept[name] != macs[name]} == {"blocks.0.mlp.fc1", "blocks.0.mlp.fc2"}


def test_model_size_counts_packed_codes_bitmap_scales_and_fp32_rest():
    model = nn.Sequential(nn.Linear(100, 10))
    attach_weight_quantizers(model, [], KeepFirst, {"keep": 10, "bits": 4})
    size = model_size(model)
    # Weight: 10 codes x 4 bits (5 B) + a 1000-bit bitmap (125 B) beats 1000 x 4 bits (500 B); + step, offset.
    assert size.compressed_bytes == 5 + 125 + 8 + 10 * 4
    assert size.fp32_bytes == 1010 * 4
    assert size.ratio == pytest.approx(4040 / 178)


def test_layer_bytes_pick_the_smaller_layout():
    assert quantized_layer_bytes(1000, 900, 8) == 1000 + 8  # dense: bitmap would cost more
    assert quantized_layer_bytes(1000, 100, 8) == 100 + 125 + 8
    assert quantized_layer_bytes(7, 7, 3) == math.ceil(21 / 8) + 8


def test_epoch_metrics_hold_summary_and_per_layer_values():
    model = create_model("resnet20", num_classes=10, img_size=16)
    assert CompressionMonitor(model, torch.zeros(3, 16, 16)).epoch_metrics() == {}
    attach_weight_quantizers(model, ["bn", "fc"], DeadZoneLDZCompander, {"init_deadzone_logit": 0.5})
    metrics = CompressionMonitor(model, torch.zeros(3, 16, 16)).epoch_metrics()
    stats = layer_stats(model)
    conv = next(s for s in stats if s.name == "layer3.2.conv2")
    assert metrics["layer_bits/layer3.2.conv2"] == conv.bits
    assert metrics["layer_sparsity/layer3.2.conv2"] == conv.sparsity > 0.3
    assert "layer_bits/fc" not in metrics
    assert 0 < metrics["rel_bops"] < conv.bits / 32
    assert metrics["sparsity"] == summary(stats)["sparsity"]


def test_bops_settings_count_activations_and_fp32_weights_at_their_bits():
    model = hand_model()
    macs = count_macs(model, torch.zeros(2, 8, 8))
    kept = structured_macs(model, torch.zeros(2, 8, 8), macs)
    stats = {s.name: s for s in layer_stats(model, macs, kept, BopsSettings(activation_bits=8, fp_weight_bits=16))}
    conv, linear = stats["0"], stats["3"]
    assert (conv.counted_bits, linear.counted_bits, linear.bits) == (3.0, 16, 32.0)  # the table keeps storage bits
    assert conv.bops == 0.25 * 4608 * 3 * 8 and linear.bops == pytest.approx(0.9 * 2560 * 16 * 8)
    assert conv.dense_bops == 4608 * 32 * 32  # the reference stays W32A32
    totals = summary(list(stats.values()))
    assert totals["rel_bops"] == pytest.approx((0.25 * 4608 * 3 * 8 + 0.9 * 2560 * 16 * 8) / ((4608 + 2560) * 1024))
    assert totals["rel_bops_structured"] == pytest.approx((1152 * 3 * 8 + 640 * 16 * 8) / ((4608 + 2560) * 1024))


def test_channels_that_nothing_reads_are_dead_and_structured_macs_drop_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1)).eval()
    with torch.no_grad():
        model[2].weight[:, 2] = 0  # a zero column: channel 2 of the first conv feeds nothing
    example = torch.zeros(2, 8, 8)
    macs = count_macs(model, example)
    assert structured_macs(model, example, macs) == {"0": 2 * 3 * 9 * 64, "2": 3 * 3 * 64}
    slim = slim_model(model, example)
    assert (slim.null_channels, slim.removed, slim.unread) == (1, 1, 1)


def test_a_model_torch_fx_cannot_trace_keeps_every_channel():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) if x.sum() > 0 else -self.conv(x)  # control flow on a value: not traceable

    model = Branchy()
    with torch.no_grad():
        model.conv.weight[1] = 0  # a null row that no analysis can follow: it stays, as --slim (which fails) keeps it
    macs = count_macs(model, torch.zeros(3, 8, 8))
    assert structured_macs(model, torch.zeros(3, 8, 8), macs) == macs
