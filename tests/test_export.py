"""Export: bit-packing, exact round trip of the fake-quantized model, size, and the command line."""
import torch

from codeq.app import cli
from codeq.app.config import config_to_dict, validate_config
from codeq.app.experiment import build_model
from codeq.app.export import model_from_export
from codeq.compression import SCALE_BYTES, model_size
from codeq.export.packed import export_model, load_export, pack_bits, unpack_bits
from conftest import quick_config, write_config


def quantized_model(tmp_path, **quantizer):
    """resnet20 at 16 px with per-layer dead zones and bit-widths spread out, and its config dict."""
    config = quick_config(tmp_path)
    config["quantizer"].update(quantizer)
    resolved = config_to_dict(validate_config(config))
    model, attached = build_model(validate_config(config), 10)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "logit" in name:
                parameter.copy_(torch.rand((), generator=generator) * 2.5 + 0.2)
    return model.eval(), resolved


def test_pack_bits_round_trips_every_width():
    generator = torch.Generator().manual_seed(0)
    for bits in range(1, 9):
        values = torch.randint(0, 2 ** bits, (1001,), generator=generator)
        packed = pack_bits(values, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == (1001 * bits + 7) // 8
        assert torch.equal(unpack_bits(packed, bits, 1001), values)


def test_export_reproduces_fake_quantized_outputs_exactly(tmp_path):
    model, config = quantized_model(tmp_path, kwargs={"learnable_bit": True, "max_bits": 8})
    out = tmp_path / "model.codeq"
    payload = export_model(model, config, 10, out)
    layers = payload["quantized"].values()
    assert {layer["sparse"] for layer in layers} == {True, False}  # both layouts are exercised
    assert len({layer["bits"] for layer in layers}) > 1
    restored = model_from_export(out)
    assert not any("parametrizations" in key for key in restored.state_dict())
    inputs = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(restored(inputs), model(inputs))


def test_uniform_quantizer_exports_too(tmp_path):
    model, config = quantized_model(tmp_path, name="uniform", kwargs={"bitwidth": 3})
    out = tmp_path / "uniform.codeq"
    export_model(model, config, 10, out)
    inputs = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model_from_export(out)(inputs), model(inputs))


def test_export_size_matches_the_size_accounting(tmp_path):
    model, config = quantized_model(tmp_path)
    out = tmp_path / "model.codeq"
    payload = export_model(model, config, 10, out)
    size = model_size(model)
    others = sum(tensor.numel() * tensor.element_size() for tensor in payload["tensors"].values())
    assert payload["codes"].numel() + SCALE_BYTES * len(payload["quantized"]) + others == size.compressed_bytes
    written = out.stat().st_size
    assert size.compressed_bytes < written < size.compressed_bytes + 16 * 1024  # names, config, zip container
    assert written < size.fp32_bytes / 4
    assert load_export(out)["config"] == config  # plain types only: weights_only loading works


def test_export_command_reports_sizes_and_rejects_bad_input(tmp_path, capsys):
    assert cli.main(["train", "--config", str(write_config(tmp_path, quick_config(tmp_path, model="mlp")))]) == 0
    checkpoint = next((tmp_path / "runs").glob("*/last.pt"))
    capsys.readouterr()
    out = tmp_path / "exported" / "model.codeq"
    assert cli.main(["export", str(checkpoint), str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"wrote {out}: {out.stat().st_size:,} B")
    assert f"checkpoint {checkpoint} {checkpoint.stat().st_size:,} B" in lines[1]

    assert cli.main(["export", str(tmp_path / "missing.pt"), str(tmp_path / "never.codeq")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("export error:") and "missing.pt" in error and "\n" not in error
    assert not (tmp_path / "never.codeq").exists()
    assert cli.main(["export", str(out), str(tmp_path / "never.codeq")]) == 2  # an export is not a training checkpoint
    assert "not a CoDeQ-train checkpoint" in capsys.readouterr().err
