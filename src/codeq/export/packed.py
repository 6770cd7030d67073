"""The ``.codeq`` file: a compressed model as bit-packed integer codes, per-layer step and offset, a sparse index.

    codeq export CHECKPOINT OUT.codeq      (``codeq.app.export``; ONNX: ``codeq.export.onnx``)

A quantized weight is stored as its integer codes c in [-Q, Q] (Q = 2^(b-1) - 1), each as c + Q in
b bits, little-endian bit order, packed into bytes; either every code (dense layout) or a bitmap of
the non-zero positions followed by the non-zero codes only (sparse layout), whichever is smaller.
It decodes as ``sign(c) * offset + step * c`` in the weight's dtype: bit for bit the quantizer's output.
A quantizer without ``grid()`` (the optional part of the ``Quantizer`` interface) is stored as a
codebook instead: its distinct values, and per weight the index of its value in ceil(log2(values)) bits.
Every other tensor of the plain model is stored as it is. The file is a ``torch.save`` of plain types
and tensors only, so ``torch.load(..., weights_only=True)`` reads it (no arbitrary unpickling):

    {"format": "codeq-export", "version": 2, "config": <the run's config>, "num_classes": int,
     "quantized": {state key: {shape, dtype, bits, step, offset | codebook, sparse, nonzero, start, mask_bytes,
                               code_bytes}},
     "codes": uint8 tensor, every layer's bytes back to back from its ``start``,
     "tensors": {dtype name: one flat tensor}, "tensor_index": {state key: [dtype name, start, shape]}}
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from codeq.attach import latent_weight, quantizer_of
from codeq.compression import packed_code_bytes, sparse_layout_is_smaller
from codeq.convert import compressed_weight, inference_state
from codeq.errors import ExportError
from codeq.io import atomic_write
from codeq.quantizers.ste import levels

FORMAT = "codeq-export"
VERSION = 2


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Non-negative integers below 2**bits as a uint8 tensor of ceil(n * bits / 8) bytes."""
    flat = ((values.reshape(-1, 1).long() >> torch.arange(bits)) & 1).to(torch.uint8).flatten()
    flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8))
    return (flat.view(-1, 8) << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """The first ``count`` values of ``pack_bits(values, bits)`` as int64."""
    flat = ((packed.reshape(-1, 1) >> torch.arange(8, dtype=torch.uint8)) & 1).flatten()[: count * bits]
    return (flat.view(count, bits).long() << torch.arange(bits)).sum(1)


def decode_weight(codes: Tensor, step: Tensor, offset: Tensor) -> Tensor:
    codes = codes.to(step.dtype)
    return torch.sign(codes) * offset + step * codes


def layer_codes(module: nn.Module) -> tuple[Tensor, Tensor, Tensor, int]:
    """(integer codes, step, offset, bits) of a quantized module; they decode to its weight exactly.

    Raises:
        ExportError: the quantizer has no ``grid()``, or its grid does not describe its output.
    """
    quantizer = quantizer_of(module)
    if not hasattr(quantizer, "grid"):
        raise ExportError(f"quantizer {type(quantizer).__name__} has no grid(weight) method, so it cannot be exported")
    weight = compressed_weight(module).cpu()
    with torch.no_grad():
        bits, step, offset = quantizer.grid(latent_weight(module))
    bits, step, offset = round(float(bits)), step.to("cpu", weight.dtype), offset.to("cpu", weight.dtype)
    # In the weight's own dtype: (w - sign(w) * offset) / step is a code of at most 127 up to a few ulps, so it
    # rounds to it (sign(w) is sign(c): offset + step > 0); the check below makes sure.
    codes = torch.round((weight - torch.sign(weight) * offset) / step).long()
    if codes.abs().max() > levels(bits) or not torch.equal(decode_weight(codes, step, offset), weight):
        raise ExportError(f"{type(quantizer).__name__} output is not sign(c)*offset + step*c with codes in "
                          f"[-{levels(bits)}, {levels(bits)}]; its grid() does not describe its output")
    return codes, step, offset, bits


def codebook_codes(weight: Tensor) -> tuple[Tensor, Tensor, int]:
    """(indices, codebook, bits): ``codebook[indices]`` is ``weight``; the codebook holds its distinct values in
    ascending order and each index takes ``bits`` = ceil(log2(len(codebook))) bits (at least 1)."""
    codebook, indices = torch.unique(weight.detach().cpu(), sorted=True, return_inverse=True)
    return indices, codebook, max(1, (len(codebook) - 1).bit_length())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def export_payload(model: nn.Module, config: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """The exported file's content for ``model`` (quantizers attached), its run config and number of classes."""
    state = inference_state(model)
    quantized, chunks, start = {}, [], 0
    for name, module in model.named_modules():
        if quantizer_of(module) is None:
            continue
        key = f"{name}.weight" if name else "weight"
        if hasattr(quantizer_of(module), "grid"):
            codes, step, offset, bits = layer_codes(module)
            flat, symbols_offset = codes.flatten(), levels(bits)
            nonzero_mask = flat != 0
            decoding = {"step": step.item(), "offset": offset.item(), "dtype": dtype_name(step.dtype)}
        else:
            weight = compressed_weight(module)
            codes, codebook, bits = codebook_codes(weight)
            flat, symbols_offset = codes.flatten(), 0
            nonzero_mask = weight.detach().cpu().flatten() != 0
            decoding = {"codebook": codebook.tolist(), "dtype": dtype_name(weight.dtype)}
        nonzero = int(torch.count_nonzero(nonzero_mask))
        sparse = sparse_layout_is_smaller(flat.numel(), nonzero, bits)
        mask = pack_bits(nonzero_mask, 1) if sparse else torch.empty(0, dtype=torch.uint8)
        packed = pack_bits((flat[nonzero_mask] if sparse else flat) + symbols_offset, bits)
        assert mask.numel() + packed.numel() == packed_code_bytes(flat.numel(), nonzero, bits, sparse)
        quantized[key] = {"shape": list(codes.shape), "bits": bits, **decoding, "sparse": sparse, "nonzero": nonzero,
                          "start": start, "mask_bytes": mask.numel(), "code_bytes": packed.numel()}
        chunks += [mask, packed]
        start += mask.numel() + packed.numel()
    flat_tensors: dict[str, list[Tensor]] = {}
    tensor_index, offsets = {}, {}
    for key, tensor in state.items():
        if key in quantized:
            continue
        kind = dtype_name(tensor.dtype)
        tensor_index[key] = [kind, offsets.get(kind, 0), list(tensor.shape)]
        offsets[kind] = offsets.get(kind, 0) + tensor.numel()
        flat_tensors.setdefault(kind, []).append(tensor.detach().cpu().reshape(-1))
    return {"format": FORMAT, "version": VERSION, "config": config, "num_classes": num_classes, "quantized": quantized,
            "codes": torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8),
            "tensors": {kind: torch.cat(parts) for kind, parts in flat_tensors.items()},
            "tensor_index": tensor_index}


def decode_state(payload: dict[str, Any]) -> dict[str, Tensor]:
    """The plain model's state dict from an export payload."""
    state = {}
    for key, (kind, start, shape) in payload["tensor_index"].items():
        numel = torch.Size(shape).numel()
        state[key] = payload["tensors"][kind][start:start + numel].view(shape).clone()
    for key, layer in payload["quantized"].items():
        numel = torch.Size(layer["shape"]).numel()
        begin = layer["start"]
        mask_bytes = payload["codes"][begin:begin + layer["mask_bytes"]]
        code_bytes = payload["codes"][begin + layer["mask_bytes"]:begin + layer["mask_bytes"] + layer["code_bytes"]]
        count = layer["nonzero"] if layer["sparse"] else numel
        dtype = getattr(torch, layer["dtype"])
        if "codebook" in layer:
            symbols = unpack_bits(code_bytes, layer["bits"], count)
            values = torch.tensor(layer["codebook"], dtype=dtype)[symbols]
        else:
            codes = unpack_bits(code_bytes, layer["bits"], count) - levels(layer["bits"])
            values = decode_weight(codes, torch.tensor(layer["step"], dtype=dtype),
                                   torch.tensor(layer["offset"], dtype=dtype))
        if layer["sparse"]:
            weight = torch.zeros(numel, dtype=dtype)
            weight[unpack_bits(mask_bytes, 1, numel).bool()] = values
        else:
            weight = values
        state[key] = weight.view(layer["shape"])
    return state


def load_export(path: Path) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ExportError(f"{path} does not exist; pass a file written by `codeq export`") from None
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user error
        raise ExportError(f"{path} is not a readable export ({type(error).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("version") != VERSION:
        raise ExportError(f"{path} is not a {FORMAT} v{VERSION} file; export the checkpoint again")
    return payload


def export_model(model: nn.Module, config: dict[str, Any], num_classes: int, out: Path) -> dict[str, Any]:
    """Write ``model`` to ``out``, read it back and check every tensor decodes bit for bit.

    Raises:
        ExportError: a layer cannot be encoded, or the written file does not decode to the model (then removed).
    """
    payload = export_payload(model, config, num_classes)
    atomic_write(out, lambda file: torch.save(payload, file))
    expected = inference_state(model)
    decoded = decode_state(load_export(out))
    mismatched = [key for key, tensor in expected.items()
                  if key not in decoded or not torch.equal(decoded[key], tensor.cpu())]
    if mismatched or decoded.keys() != expected.keys():
        out.unlink()
        raise ExportError(f"round trip failed for {', '.join(mismatched) or 'the set of tensors'}; nothing written")
    return payload
