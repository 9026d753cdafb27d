"""Filling a model built on the meta device from (sharded) safetensors, one tensor at a time.

A published 7B/8B checkpoint is `model.safetensors.index.json` plus shards (or a single
`model.safetensors`). The model is built on the meta device (no memory), allocated once at the
target dtype and device (`to_empty`), and each checkpoint tensor is read straight into its place:
bytes go from the file into the parameter (through one temporary tensor only when the dtype
changes or the parameter lives on a GPU). So a model never exists twice in memory.

We read the safetensors format ourselves (an 8-byte header length, a JSON header, raw bytes)
with plain file reads instead of `safe_open`: safe_open memory-maps the file, and the mapped
pages it touches count as the process's resident memory until the file is closed, which would
put a whole shard on top of the model. Every header field is checked before a byte is read.

`slots` says where each checkpoint tensor goes: name -> (parameter name, first row, last row),
so several checkpoint tensors can fill row ranges of one fused parameter (q, k, v -> qkv).
Any mismatch (a missing or unexpected tensor, a wrong shape, a missing shard) is one AdjustError
naming the tensor or the shard.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..errors import AdjustError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
MAX_HEADER = 100 * 2 ** 20  # safetensors' own limit on the JSON header


def shard_map(path: Path) -> dict[str, Path]:
    """tensor name -> shard file, from the index (sharded) or the single file's header."""
    index = path / INDEX
    if index.is_file():
        from ..io import read_json

        raw = read_json(index, "checkpoint index")
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise AdjustError(f"{index} has no valid weight_map")
        out = {}
        for name, shard in weight_map.items():
            file = path / shard
            if Path(shard).name != shard:
                raise AdjustError(f"{index} names shard {shard!r} outside the model directory")
            if not file.is_file():
                raise AdjustError(f"checkpoint shard {shard} (holding {name}) is missing from {path}")
            out[name] = file
        return out
    single = path / SINGLE
    if single.is_file():
        return {name: single for name in read_header(single)}
    raise AdjustError(f"no weights in {path}: neither {INDEX} nor {SINGLE}")


def read_header(file: Path) -> dict[str, tuple[torch.dtype, tuple, int, int]]:
    """name -> (dtype, shape, start byte, end byte) of every tensor in a safetensors file, checked."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(MAX_HEADER, size - 8):
            raise AdjustError(f"corrupt safetensors file {file}: bad header length")
        try:
            raw = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise AdjustError(f"corrupt safetensors file {file}: the header is not JSON") from None
    if not isinstance(raw, dict):
        raise AdjustError(f"corrupt safetensors file {file}: the header is not a JSON object")
    out = {}
    for name, info in raw.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            a, b = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise AdjustError(f"corrupt safetensors file {file}: bad entry for tensor {name}") from None
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if min(shape, default=0) < 0 or not 0 <= a <= b or b - a != nbytes or 8 + n + b > size:
            raise AdjustError(f"corrupt safetensors file {file}: tensor {name} does not fit its byte range")
        out[name] = (dtype, shape, 8 + n + a, 8 + n + b)
    return out


def fill_from_checkpoint(model: nn.Module, path: Path, slots: dict[str, tuple[str, int, int]], dtype: torch.dtype,
                         device: torch.device) -> None:
    """Allocate `model` (built on the meta device) at dtype/device and read every tensor of `path` into it.

    `slots`: checkpoint name -> (parameter name, row_lo, row_hi); each parameter must be covered
    exactly once by its slots. Checks names and shapes before allocating anything."""
    files = shard_map(path)
    missing = sorted(set(slots) - set(files))
    if missing:
        raise AdjustError(f"checkpoint in {path} lacks tensor {missing[0]}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(set(files) - set(slots))
    if unexpected:
        raise AdjustError(f"checkpoint in {path} has unexpected tensor {unexpected[0]} for this config"
                          + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    params = dict(model.named_parameters())
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    headers = {file: read_header(file) for file in by_file}
    for file, names in by_file.items():
        for name in names:
            if name not in headers[file]:
                raise AdjustError(f"checkpoint shard {file.name} lacks tensor {name} (the index says it holds it)")
            param, lo, hi = slots[name]
            want = (hi - lo, *params[param].shape[1:])
            got = headers[file][name][1]
            if tuple(got) != want:
                raise AdjustError(f"tensor {name} in {file.name} has shape {list(got)}, but the config needs "
                                  f"{list(want)}")
    _allocate(model, dtype, device)  # the one allocation, at the target dtype
    params = dict(model.named_parameters())  # the new, allocated parameters
    filled = {name: 0 for name in params}
    with torch.no_grad():
        for file, names in by_file.items():
            header = headers[file]
            with open(file, "rb") as f:
                for name in sorted(names, key=lambda n: header[n][2]):  # in file order
                    src_dtype, shape, a, b = header[name]
                    param, lo, hi = slots[name]
                    _read_into(f, a, b, src_dtype, shape, params[param].data[lo:hi])
                    filled[param] += hi - lo
    empty = [name for name, rows in filled.items() if rows != params[name].shape[0]]
    if empty:  # a bug in a family's slots, never the user's file: fail before uninitialised memory is used
        raise AdjustError(f"internal error: parameter {empty[0]} was not filled from the checkpoint")


def _allocate(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Replace every meta parameter/buffer by uninitialised memory (floating point at `dtype`).

    Like `to_empty` after `to(dtype)`, but with plain torch.empty: empty_like on meta tensors costs
    about a second and 35 MiB of one-off imports in torch 2.13."""
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, t in table.items():
                if t is None:
                    continue
                new = torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device=device)
                table[key] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new


def _read_into(f, start: int, end: int, src_dtype, shape, dest: torch.Tensor) -> None:
    f.seek(start)
    if dest.dtype == src_dtype and dest.device.type == "cpu" and dest.is_contiguous():
        buf = dest.view(-1).view(torch.uint8) if dest.numel() else dest.view(torch.uint8)
        if f.readinto(buf.numpy()) != end - start:
            raise AdjustError(f"truncated safetensors file {f.name}")
        return
    tmp = torch.empty(shape, dtype=src_dtype)
    if f.readinto(tmp.view(-1).view(torch.uint8).numpy()) != end - start:
        raise AdjustError(f"truncated safetensors file {f.name}")
    dest.copy_(tmp)


def write_checkpoint(state: dict[str, torch.Tensor], out: Path, shards: int = 1) -> None:
    """Write `state` as `shards` safetensors files plus model.safetensors.index.json, in the Hugging Face
    layout (model-00001-of-0000N.safetensors), or one model.safetensors when shards == 1. Tests and demos."""
    from safetensors.torch import save_file

    from ..io import atomic_path, write_json

    out.mkdir(parents=True, exist_ok=True)
    names = list(state)
    if shards == 1:
        with atomic_path(out / SINGLE) as tmp:
            save_file({k: state[k].contiguous() for k in names}, str(tmp), metadata={"format": "pt"})
        return
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for s in range(shards):
        part = names[s * per:(s + 1) * per]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        with atomic_path(out / file) as tmp:
            save_file({k: state[k].contiguous() for k in part}, str(tmp), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
        total += sum(state[k].numel() * state[k].element_size() for k in part)
    write_json(out / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
