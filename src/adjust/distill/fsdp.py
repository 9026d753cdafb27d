"""A frozen base too large for one device: shard its layers over the processes with FSDP2.

`adjust distill --shard-base` (under `accelerate launch` with several processes) loads the base
on the CPU, then applies PyTorch's FSDP2 `fully_shard` to each of its decoder layers over a
1-D mesh of all processes: every process keeps 1/world of each layer's weights on its device,
and a layer's full weights exist only while that layer runs (all-gathered before its forward,
freed after it). The embedding, the output head and the final norm stay whole on every
process, because the sampler reads the embedding and the head directly (docs/method.md section 4)
and they are a small part of a 7B model (2 x 1.1 GB in bf16 for Dream's 152k x 3584).

Only the sampler is trained (DDP, as without sharding); the base has no optimizer state and
no gradients. FSDP's collectives need every process to run the base the same number of
times: `distill` runs it twice per training step on every process (each on its own slice of
the global batch, never an empty one) and the same held-out batches everywhere.

The decoder layers are found without knowing the architecture: the `nn.ModuleList` holding
the most parameters (TinyBase `model.blocks`, Qwen2/Llama/Dream `model.layers`, LLaDA
`transformer.blocks`, BERT `encoder.layer`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AdjustError


def decoder_layers(base) -> nn.ModuleList:
    """The base's stack of repeated layers: its ModuleList with the most parameters."""
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise AdjustError(f"cannot shard base {base.name!r}: it has no list of layers (nn.ModuleList)")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def shard_base(base, device: torch.device | str) -> dict:
    """FSDP2-shard the base's decoder layers over all processes; move the rest of the base to `device`.

    Needs an initialised process group (accelerate does it). Returns what each process holds:
    {"layers", "world", "layer_params", "local_layer_params", "replicated_params"}.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        raise AdjustError("--shard-base needs several processes: start distill with `accelerate launch "
                          "--num_processes N` (N >= 2)")
    device = torch.device(device)
    world = dist.get_world_size()
    layers = decoder_layers(base)
    full = sum(p.numel() for p in layers.parameters())
    mesh = init_device_mesh(device.type, (world,))
    for layer in layers:
        layer.requires_grad_(False)
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)  # shards land on the mesh's device
    in_layers = {id(t) for t in [*layers.parameters(), *layers.buffers()]}
    with torch.no_grad():
        for module in base.modules():  # the rest (embedding, head, norms, rotary buffers): whole, on device
            for name, p in module.named_parameters(recurse=False):
                if id(p) not in in_layers and p.device != device:
                    p.data = p.data.to(device)
            for name, b in module.named_buffers(recurse=False):
                if id(b) not in in_layers and b.device != device:
                    module._buffers[name] = b.to(device)
    local = sum(p.to_local().numel() for p in layers.parameters())
    replicated = sum(p.numel() for p in base.parameters() if id(p) not in in_layers)
    return {"layers": len(layers), "world": world, "layer_params": full, "local_layer_params": local,
            "replicated_params": replicated}
