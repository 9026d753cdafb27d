"""`adjust convert paper-sampler`: a sampler written by the ADJUST paper's training code, in our format.

The paper's sampler is our architecture with the base's own layer shape (`SamplerConfig.for_base(arch="paper")`):
a 2H -> H projection with a bias, grouped-query attention with the base's head counts and q/k/v bias, the base's
SwiGLU width and norm eps. Its state dict names differ from ours, and ours fuses q/k/v and gate/up into one
matrix each; NAMES below says which of its tensors make each of ours, per base family, as data: a LLaDA layout
is one more entry there (docs/models.md says what such a sampler needs).

Accepted files: safetensors, or a pickled `.ckpt` / `.bin` read with `weights_only=True` only (no code runs;
a Lightning checkpoint's `state_dict` is used). Keys may carry the Lightning module's `drafter.` prefix, and a
full checkpoint's `base_model.*` entries (the frozen base) are ignored. Every shape is checked against what the
base implies before anything is written; the sampler records the base's identity, so it refuses any other base.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import AdjustError

# our tensor -> the paper's tensors that make it, concatenated along dim 0 (q, k, v rows; gate, up rows)
NAMES = {
    "dream": {
        "proj.weight": ["down_project.0.weight"],
        "proj.bias": ["down_project.0.bias"],
        "embed_norm.weight": ["norm_embed.0.weight"],
        "prior_norm.weight": ["norm_hidden.0.weight"],
        "out_norm.weight": ["norm_postattn.0.weight"],
        "block.attn_norm.weight": ["layers.0.0.input_layernorm.weight"],
        "block.mlp_norm.weight": ["layers.0.0.post_attention_layernorm.weight"],
        "block.attn.qkv.weight": ["layers.0.0.self_attn.q_proj.weight", "layers.0.0.self_attn.k_proj.weight",
                                  "layers.0.0.self_attn.v_proj.weight"],
        "block.attn.qkv.bias": ["layers.0.0.self_attn.q_proj.bias", "layers.0.0.self_attn.k_proj.bias",
                                "layers.0.0.self_attn.v_proj.bias"],
        "block.attn.out.weight": ["layers.0.0.self_attn.o_proj.weight"],
        "block.mlp.gate_up.weight": ["layers.0.0.mlp.gate_proj.weight", "layers.0.0.mlp.up_proj.weight"],
        "block.mlp.down.weight": ["layers.0.0.mlp.down_proj.weight"],
    },
}
PREFIX = "drafter."  # the paper's Lightning module holds the sampler under this name
IGNORED = ("base_model.",)  # a full checkpoint's frozen base


def _ignored(key: str) -> bool:
    """A full checkpoint's frozen base, with or without the prefix."""
    return key.removeprefix(PREFIX).startswith(IGNORED)


def read_state(path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or of a pickled checkpoint read weights-only."""
    path = Path(path)
    if not path.is_file():
        raise AdjustError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file
            raise AdjustError(f"{path} is not a readable safetensors file: {str(e).splitlines()[0]}") from None
    from .convert import read_pickled_state

    try:
        return read_pickled_state(path)
    except AdjustError as e:
        raise AdjustError(f"{e}. Export the state dict as safetensors where the checkpoint was written: "
                          "python -c \"import torch; from safetensors.torch import save_file; "
                          "s = torch.load('FILE.ckpt', map_location='cpu')['state_dict']; "
                          "save_file({k: v.contiguous() for k, v in s.items()}, 'sampler.safetensors')\"") from None


def our_state(paper: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """The paper's tensors (prefix stripped, base entries dropped) mapped to our names; unknown or missing
    tensors are one error naming them."""
    names = NAMES.get(family)
    if names is None:
        raise AdjustError(f"no name mapping for a {family!r} sampler of the paper's code; known: {', '.join(NAMES)}")
    state = {key.removeprefix(PREFIX): value for key, value in paper.items() if not _ignored(key)}
    wanted = {n for parts in names.values() for n in parts}
    unknown, missing = sorted(set(state) - wanted), sorted(wanted - set(state))
    if unknown or missing:
        raise AdjustError("the weights are not a sampler of the paper's code for a "
                          f"{family} base: " + "; ".join(x for x in (
                              f"unexpected {', '.join(unknown[:6])}" if unknown else "",
                              f"missing {', '.join(missing[:6])}" if missing else "") if x))
    return {ours: torch.cat([state[n].float() for n in parts]) if len(parts) > 1 else state[parts[0]].float()
            for ours, parts in names.items()}


def convert_paper_sampler(weights, base_dir, out, base_type: str = "auto") -> dict:
    """Convert the paper's sampler for the base in `base_dir` into our format in `out`; returns a summary."""
    from .io import atomic_dir
    from .loader import ModelSpec, load_models
    from .sampler import JointSampler, SamplerConfig

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AdjustError(f"--out {out} exists and is not an empty directory")
    paper = read_state(weights)
    # bfloat16: half the memory of float32 at 7B; the shapes and the identity (its fingerprint is of bfloat16
    # embeddings whatever the dtype) are the same
    base, _ = load_models(ModelSpec(base=str(base_dir), base_type=base_type, dtype="bfloat16"), "none")
    family = getattr(base, "family", None) or type(base).__name__.lower()
    cfg = SamplerConfig.for_base(base, arch="paper")
    sampler = JointSampler(cfg)
    state = our_state(paper, family)
    expected = sampler.state_dict()
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            parts = ", ".join(NAMES[family][name])
            raise AdjustError(f"{parts}: shape {tuple(tensor.shape)} does not fit base {base.name} (hidden "
                              f"{cfg.hidden_size}, {cfg.num_heads} heads / {cfg.num_kv_heads} key-value heads, "
                              f"SwiGLU {cfg.intermediate_size}): expected {tuple(expected[name].shape)}")
    sampler.load_state_dict(state)
    with atomic_dir(out) as tmp:
        sampler.save(tmp, extra={"converted_from": {"format": "paper-sampler", "weights": Path(weights).name,
                                                    "family": family}})
    return {"out": str(out), "base": base.name, "family": family, "tensors": len(state),
            "params": sum(t.numel() for t in state.values()), "ignored": sorted(k for k in paper if _ignored(k))[:5]}
