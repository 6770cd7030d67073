"""The public API of `codeq`, as a user's own loop calls it: values, groups, errors naming the argument."""
import warnings

import pytest
import torch
from torch import nn

import codeq
from codeq.attach import percentiles_selected_together, quantization_for, quantized_layers, weights_quantized_once


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, 10))


def test_prepare_quantizes_by_name_kwargs_and_exclusions():
    model = codeq.prepare(small_cnn(), "deadzone", {"fixed_bit_val": 3, "learnable_bit": False},
                          exclude_layers=["type:BatchNorm2d"])
    names = [name for name, _, _ in quantized_layers(model)]
    assert names == ["0", "5"]
    quantizer = model[0].parametrizations.weight[0].quantizer
    assert isinstance(quantizer, codeq.DeadZoneLDZCompander) and float(quantizer.bit_width()) == 3
    assert len(torch.unique(model[0].weight.detach())) <= 2 ** 3 - 1  # codes -3..3
    uniform = codeq.prepare(small_cnn(), "uniform", {"bitwidth": 8}, exclude_layers=["re:^1$"])
    assert [name for name, _, _ in quantized_layers(uniform)] == ["0", "5"]


def test_prepare_warns_about_quantized_norms_and_names_the_entry():
    with pytest.warns(UserWarning, match=r"quantizing 1 normalisation layer \(1\).*'type:BatchNorm2d'") as caught:
        codeq.prepare(small_cnn())
    assert caught[0].filename == __file__  # the user's line, not codeq's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        codeq.prepare(small_cnn(), exclude_layers=["type:BatchNorm2d"])
        norms = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.GroupNorm(2, 4))
    with pytest.warns(UserWarning, match=r"2 normalisation layers.*'type:LayerNorm', 'type:GroupNorm'"):
        codeq.prepare(norms)


def test_prepare_warns_about_exclusions_that_match_no_layer():
    with pytest.warns(UserWarning, match=r"exclude_layers \['type:BatchNorm', 're:\^fc\$'\] match no layer that "
                                         r"owns a weight, so they exclude nothing") as caught:
        model = codeq.prepare(small_cnn(), exclude_layers=["type:BatchNorm", "type:BatchNorm2d", "re:^fc$", "5"])
    assert caught[0].filename == __file__ and len(caught) == 1
    assert [name for name, _, _ in quantized_layers(model)] == ["0"]


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda: codeq.prepare("model"), TypeError, r"prepare\(model=...\) takes an nn.Module"),
    (lambda: codeq.prepare(small_cnn(), "dedzone"), ValueError, r"prepare\(name='dedzone'\): unknown quantizer"),
    (lambda: codeq.prepare(small_cnn(), {"fixed_bit_val": 4}), TypeError,
     r"prepare\(name=...\) takes a quantizer's name such as 'deadzone', got dict; pass its settings as kwargs"),
    (lambda: codeq.prepare(small_cnn(), kwargs={"bits": 4}), ValueError, r"prepare\(kwargs=.*refuses"),
    (lambda: codeq.prepare(small_cnn(), kwargs={"fixed_bit_val": 9}), ValueError, "fixed_bit_val must be in"),
    (lambda: codeq.prepare(small_cnn(), exclude_layers="bn"), TypeError, r"exclude_layers=...\) takes a list"),
    (lambda: codeq.prepare(small_cnn(), exclude_layers=["re:("]), ValueError, "not a valid regular expression"),
    (lambda: codeq.prepare(codeq.prepare(small_cnn(), exclude_layers=["1"])), ValueError, "already has quantizers"),
])
def test_prepare_refuses_bad_arguments_by_name(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_param_groups_split_the_logits_and_drop_or_double_nothing():
    model = codeq.prepare(small_cnn(), exclude_layers=["type:BatchNorm2d"])
    groups = codeq.param_groups(model, base={"lr": 1e-3}, dz={"lr": 1e-2, "weight_decay": 5.0}, bit={"lr": 1e-4})
    assert [group["name"] for group in groups] == ["base", "dz", "bit"]
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    by_group = {group["name"]: [names[id(p)] for p in group["params"]] for group in groups}
    assert all(name.endswith("logit_dz") for name in by_group["dz"]) and len(by_group["dz"]) == 2
    assert all(name.endswith("logit_bit") for name in by_group["bit"]) and len(by_group["bit"]) == 2
    assert sorted(sum(by_group.values(), [])) == sorted(names.values())
    assert groups[1]["weight_decay"] == 5.0
    torch.optim.AdamW(groups)  # any torch optimizer takes them
    merged = codeq.param_groups(model, base={"lr": 1e-3})  # no dz/bit options: the logits stay in base
    assert len(merged) == 1 and len(merged[0]["params"]) == len(names)


def test_param_groups_merge_with_a_callers_no_decay_split():
    model = codeq.prepare(small_cnn(), exclude_layers=["type:BatchNorm2d"])
    decay = [p for name, p in model.named_parameters() if p.dim() > 0 and "bias" not in name and "1." != name[:2]]
    no_decay = [p for p in model.parameters() if all(p is not q for q in decay)]
    groups = codeq.param_groups(model, base=[{"params": decay, "weight_decay": 0.01},
                                             {"params": no_decay, "weight_decay": 0.0}], dz={"weight_decay": 4.0})
    assert [group["name"] for group in groups] == ["base.0", "base.1", "dz"]
    counted = [id(p) for group in groups for p in group["params"]]
    assert sorted(counted) == sorted(id(p) for p in model.parameters()) and len(set(counted)) == len(counted)
    names = {id(p): name for name, p in model.named_parameters()}
    assert not any("logit_dz" in names[id(p)] for group in groups[:2] for p in group["params"])
    with pytest.raises(ValueError, match="are in none of the groups"):
        codeq.param_groups(model, base=[{"params": decay}])
    with pytest.raises(ValueError, match="is in two groups"):
        codeq.param_groups(model, base=[{"params": decay}, {"params": list(model.parameters())}])
    with pytest.raises(TypeError, match="takes optimizer options"):
        codeq.param_groups(model, base=[decay])


def test_quantized_step_quantizes_each_weight_once_and_picks_the_compiled_path():
    model = codeq.prepare(small_cnn(), exclude_layers=["type:BatchNorm2d"])
    assert quantization_for(model) is weights_quantized_once
    calls = []
    model[0].parametrizations.weight[0].register_forward_hook(lambda *_: calls.append(1))
    with codeq.quantized_step(model):
        model(torch.randn(2, 3, 8, 8))
        model(torch.randn(2, 3, 8, 8))
    assert len(calls) == 1
    compiled = torch.compile(model)  # not run: only which block it gets
    assert quantization_for(compiled) is percentiles_selected_together
    with pytest.raises(TypeError, match=r"quantized_step\(model=...\)"):
        codeq.quantized_step([model])


def test_compression_report_counts_zeros_bits_bops_and_size():
    model = codeq.prepare(small_cnn(), "deadzone", {"fixed_bit_val": 4, "learnable_bit": False},
                          exclude_layers=["type:BatchNorm2d"])
    with torch.no_grad():
        model[0].parametrizations.weight.original[:4] = 0  # half the conv's rows exactly zero
    report = codeq.compression_report(model, torch.zeros(3, 8, 8))
    conv, fc = report["layers"]
    assert conv["name"] == "0" and conv["bits"] == 4 and conv["macs"] == 8 * 3 * 9 * 64
    quantized = [model[0].weight.detach(), model[5].weight.detach()]
    zeros = sum(int((w == 0).sum()) for w in quantized)
    assert report["sparsity"] == pytest.approx(zeros / sum(w.numel() for w in quantized))
    assert report["mean_bits"] == 4.0
    bops = sum(row["macs"] * (row["nonzero"] / row["numel"]) * 4 * 32 for row in (conv, fc))
    assert report["rel_bops"] == pytest.approx(bops / ((conv["macs"] + fc["macs"]) * 32 * 32))
    assert 0 < report["size_bytes"] < report["fp32_bytes"]
    assert codeq.compression_report(model, torch.zeros(1, 3, 8, 8), activation_bits=8)["rel_bops"] == \
        pytest.approx(report["rel_bops"] / 4)
    with pytest.raises(ValueError, match=r"activation_bits=0"):
        codeq.compression_report(model, torch.zeros(3, 8, 8), activation_bits=0)
    with pytest.raises(TypeError, match="example_input"):
        codeq.compression_report(model, [0.0])


def test_compression_report_counts_a_transformers_linear_macs_for_one_sequence_of_token_ids():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    hidden, intermediate, layers, labels, length = 16, 32, 2, 3, 10
    model = BertForSequenceClassification(BertConfig(
        vocab_size=20, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=intermediate, max_position_embeddings=length, num_labels=labels))
    codeq.prepare(model, exclude_layers=["type:Embedding", "type:LayerNorm", "classifier"])
    report = codeq.compression_report(model, torch.randint(0, 20, (length,)))  # one item, its ModelOutput probed
    # Per token and layer: query, key, value, attention output (hidden x hidden), intermediate and output (hidden x
    # intermediate); the pooler and classifier see the [CLS] token only.
    per_layer = length * (4 * hidden * hidden + 2 * hidden * intermediate)
    assert report["macs"] == layers * per_layer + hidden * hidden + hidden * labels
    rows = {row["name"]: row for row in report["layers"]}
    assert rows["bert.encoder.layer.0.attention.self.query"]["macs"] == length * hidden * hidden
    assert rows["classifier"]["macs"] == hidden * labels and not rows["classifier"]["quantized"]
    assert len(rows) == 6 * layers + 2 and report["rel_bops_structured"] >= report["rel_bops"] > 0
    with pytest.raises(ValueError, match=r"example_input=...\): the model fails on it as a batch of one \[1, 4, 10\] "
                                         r"\(ValueError: .*\); pass one input without its batch dimension"):
        codeq.compression_report(model, torch.randint(0, 20, (4, length)))  # a batch of sequences is no item


def test_convert_is_a_plain_copy_with_the_same_outputs():
    model = codeq.prepare(small_cnn(), exclude_layers=["type:BatchNorm2d"]).eval()
    plain = codeq.convert(model)
    inputs = torch.randn(4, 3, 8, 8)
    assert torch.equal(plain(inputs), model(inputs)) and not plain.training
    assert not any(quantized_layers(plain)) and all("logit" not in name for name, _ in plain.named_parameters())
    assert any(quantized_layers(model))  # the original keeps its quantizers
    assert set(plain.state_dict()) == set(small_cnn().state_dict())


def test_recalibrate_bn_gives_the_statistics_of_the_quantized_weights():
    model = codeq.prepare(small_cnn(), exclude_layers=["type:BatchNorm2d"])
    batches = [torch.randn(16, 3, 8, 8) + index for index in range(3)]
    model[1].running_mean.fill_(100.0)  # stale
    model.eval()
    assert codeq.recalibrate_bn(model, [(batch, None) for batch in batches], batches=2) == 2
    assert not model.training and model[1].momentum == 0.1
    with torch.no_grad():
        activations = [model[0](batch) for batch in batches[:2]]
    expected = torch.stack([a.mean((0, 2, 3)) for a in activations]).mean(0)
    assert torch.allclose(model[1].running_mean, expected, atol=1e-5)
    assert codeq.recalibrate_bn(nn.Linear(2, 2), batches) == 0
    with pytest.raises(ValueError, match="batches=0"):
        codeq.recalibrate_bn(model, batches, batches=0)
    with pytest.raises(TypeError, match="a batch must be a tensor"):
        codeq.recalibrate_bn(model, [{"x": batches[0]}])


def test_dz_l2_and_bit_l2_sum_the_squared_logits():
    model = codeq.prepare(small_cnn(), "deadzone", {"init_deadzone_logit": 2.0, "init_bit_logit": 1.5},
                          exclude_layers=["type:BatchNorm2d"])
    assert codeq.dz_l2(model).item() == pytest.approx(2 * 2.0 ** 2)
    assert codeq.bit_l2(model).item() == pytest.approx(2 * 1.5 ** 2)
    fixed = codeq.prepare(small_cnn(), kwargs={"learnable_bit": False}, exclude_layers=["type:BatchNorm2d"])
    assert codeq.bit_l2(fixed).item() == 0.0  # a fixed bit-width is no parameter to press on
    codeq.dz_l2(model).backward()
    assert model[0].parametrizations.weight[0].quantizer.logit_dz.grad.item() == pytest.approx(4.0)


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda: codeq.param_groups(small_cnn().state_dict(), base={}), TypeError,
     r"param_groups\(model=...\) takes an nn.Module, got OrderedDict"),
    (lambda: codeq.param_groups(small_cnn(), base=1e-3), TypeError, r"param_groups\(base=...\) takes optimizer "
     r"options \(a dict, \{'lr': 1e-3\}\) or a list of groups, each a dict with 'params'; got float"),
    (lambda: codeq.param_groups(small_cnn(), base=[{"lr": 1.0}]), TypeError, r"with 'params'; got \{'lr': 1.0\}"),
    (lambda: codeq.param_groups(small_cnn(), base={}, dz=5.0), TypeError, r"param_groups\(dz=5.0\): give the "
     r"group's optimizer options as a dict"),
    (lambda: codeq.recalibrate_bn(None, []), TypeError, r"recalibrate_bn\(model=...\) takes an nn.Module"),
    (lambda: codeq.recalibrate_bn(small_cnn(), torch.zeros(4, 3, 8, 8)), TypeError,
     r"recalibrate_bn\(loader=...\) takes batches .* got one tensor: pass \[inputs\]"),
    (lambda: codeq.convert("model"), TypeError, r"convert\(model=...\) takes an nn.Module, got str"),
    (lambda: codeq.export_onnx(small_cnn().state_dict(), torch.zeros(3, 8, 8), "m.onnx"), TypeError,
     r"export_onnx\(model=...\) takes an nn.Module, got OrderedDict"),
    (lambda: codeq.export_onnx(small_cnn(), [3, 8, 8], "m.onnx"), TypeError,
     r"export_onnx\(example_input=...\) takes a tensor"),
    (lambda: codeq.export_onnx(small_cnn(), torch.zeros(3, 8, 8), "."), ValueError,
     r"export_onnx\(path='.'\) is a directory: give the .onnx file to write"),
])
def test_public_functions_refuse_bad_arguments_by_name(call, error, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=message):
        call()
    assert not any(tmp_path.iterdir())
