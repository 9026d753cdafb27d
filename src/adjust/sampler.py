"""The one-layer joint sampler (docs/method.md section 4).

    e   = RMSNorm(embed(x))                 frozen base embedding of the current tokens
    p   = RMSNorm(prior)                    base hidden states (first unroll) or own output
    z   = Linear(E + H -> H)([e ; p])        E = H but where the base factorises embeddings (ALBERT, ELECTRA)
    z   = Block(z)                          bidirectional attention (RoPE) + SwiGLU (`num_layers` of them: 1, the
                                            method's, unless `adjust distill --sampler-layers` asks for more)
    out = RMSNorm(z) + prior                post-norm plus residual
    logits = base.lm_head(out)              frozen, shared with the base

The same weights serve every unroll. Saved like a Hugging Face model (config.json +
model.safetensors); the config records the base's identity so it refuses any other base,
and the decoding settings of the rollouts it was distilled on (order rule, temperature,
top-p, top-k, blocks): generating with others warns once (`check_decoding`).

The sampler computes in the dtype of its own weights: loaded for a base, they take the base's
dtype; during distillation they stay float32 (the optimizer's master weights) whatever the
base's dtype, with the base's hidden states cast in and the result cast back out.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import AdjustError
from .io import atomic_path, config_from_json, load_state, load_weights, read_json, write_json
from .layers import Block, RMSNorm, rope_for

SAMPLER_TYPE = "adjust-sampler"
# Sampler architectures `adjust distill --sampler-arch` trains: ours (the default) and the paper's (see for_base)
SAMPLER_ARCHS = ("ours", "paper")


@dataclass
class SamplerConfig:
    hidden_size: int
    num_heads: int
    intermediate_size: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    base: dict = field(default_factory=dict)  # identity of the base model it was distilled from
    # decoding settings of the rollouts it was distilled on: order, temperature, top_p, top_k, block_length
    distilled_on: dict = field(default_factory=dict)
    # width of the base's token embeddings where it is not hidden_size (ALBERT, ELECTRA factorise them); None: H
    embed_size: int | None = None
    # the paper's architecture (for_base(arch="paper")): grouped-query attention with the base's key/value heads
    # (None: as many as query heads), q/k/v bias, a bias on the 2H -> H projection
    num_kv_heads: int | None = None
    qkv_bias: bool = False
    proj_bias: bool = False
    # blocks after the projection: 1 is the method's sampler; more are an option (`--sampler-layers`)
    num_layers: int = 1

    # Fields a saved config.json may lack (fields added later, whose default is what older files meant);
    # every other field must be in the file (io.config_from_json).
    OPTIONAL_FIELDS = ("distilled_on", "embed_size", "num_kv_heads", "qkv_bias", "proj_bias", "num_layers")

    @classmethod
    def for_base(cls, base, intermediate_ratio: float = 8 / 3, num_heads: int | None = None,
                 arch: str = "ours", num_layers: int = 1) -> "SamplerConfig":
        """A sampler sized for `base`. arch "ours": head dim 64 (or the base's heads), SwiGLU width ~8/3 H, eps 1e-6.
        arch "paper": the paper's sampler, one decoder layer of the base's own shape (its query and key/value heads,
        q/k/v bias, SwiGLU width and norm eps) and a 2H -> H projection with a bias (native Dream / LLaDA bases).
        `num_layers`: blocks after the projection (1: the method's one-layer sampler)."""
        if arch not in SAMPLER_ARCHS:
            raise AdjustError(f"unknown --sampler-arch {arch!r}; choose one of {', '.join(SAMPLER_ARCHS)}")
        if arch == "paper":
            shape = getattr(base, "cfg", None)
            if shape is None or not hasattr(shape, "num_kv_heads"):
                raise AdjustError(f"--sampler-arch paper takes the layer shape of a native Dream or LLaDA base; "
                                  f"{base.name} ({type(base).__name__}) is not one")
            return cls(base.hidden_size, shape.num_heads, shape.intermediate_size, rope_theta=float(shape.rope_theta),
                       norm_eps=float(shape.norm_eps), base=base.identity(), num_kv_heads=shape.num_kv_heads,
                       qkv_bias=bool(shape.qkv_bias), proj_bias=True, num_layers=num_layers)
        H = base.hidden_size
        heads = num_heads or getattr(base, "num_heads", None) or max(1, H // 64)
        inter = int(16 * round(intermediate_ratio * H / 16))
        theta = float(getattr(base, "rope_theta", 10000.0))
        E = getattr(base, "embed_size", None)
        return cls(H, heads, inter, rope_theta=theta, base=base.identity(), embed_size=None if E in (None, H) else E,
                   num_layers=num_layers)


class JointSampler(nn.Module):
    def __init__(self, cfg: SamplerConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden_size
        if cfg.num_heads < 1 or H % cfg.num_heads or (H // cfg.num_heads) % 2:
            raise AdjustError(f"sampler hidden size {H} must split into {cfg.num_heads} heads of even size")
        E = cfg.embed_size or H
        self.embed_norm = RMSNorm(E, cfg.norm_eps)
        self.prior_norm = RMSNorm(H, cfg.norm_eps)
        self.proj = nn.Linear(E + H, H, bias=cfg.proj_bias)
        if isinstance(cfg.num_layers, bool) or not isinstance(cfg.num_layers, int) or cfg.num_layers < 1:
            raise AdjustError(f"sampler num_layers must be an integer of at least 1, got {cfg.num_layers!r}")

        def layer():
            return Block(H, cfg.num_heads, cfg.intermediate_size, cfg.norm_eps, cfg.num_kv_heads, cfg.qkv_bias)

        self.block = layer()  # the first (the one-layer sampler's only) block; its weights keep their saved names
        self.more_blocks = nn.ModuleList(layer() for _ in range(cfg.num_layers - 1))
        self.out_norm = RMSNorm(H, cfg.norm_eps)
        for m in self.modules():  # fresh initialisation, not copied from the base
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        self._warned: set = set()

    def forward(self, base, input_ids: torch.Tensor, prior: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One unroll: (B, L) tokens + (B, L, H) prior -> (B, L, H) new aligned hidden states.

        Computed in the dtype of the sampler's weights; the result has the prior's dtype."""
        own, z = self._inputs(base, input_ids, prior)
        cos, sin = self._rope(input_ids, attention_mask, z.dtype)
        key_mask = None if attention_mask is None else attention_mask.bool()
        for block in self.blocks:
            z = block(z, cos, sin, key_mask)
        return (self.out_norm(z) + own).to(prior.dtype)

    @property
    def blocks(self) -> list:
        return [self.block, *self.more_blocks]

    @property
    def deep(self) -> bool:
        """More than one block: the later blocks read what was written through other positions (the prompt's copy
        of a written word), so an unroll restricted to some rows (the fast unroll, a cached one) misses it."""
        return len(self.more_blocks) > 0

    def _inputs(self, base, input_ids, prior):
        """(prior in the sampler's dtype, z = proj([norm(embed(x)); norm(prior)])) for the given rows."""
        dtype = self.proj.weight.dtype
        own = prior.to(dtype)
        e = self.embed_norm(base.embed(input_ids).to(dtype))
        return own, self.proj(torch.cat([e, self.prior_norm(own)], dim=-1))  # (B, n, H)

    def _rope(self, input_ids, attention_mask, dtype):
        return rope_for(attention_mask, input_ids.shape, input_ids.device,
                        self.cfg.hidden_size // self.cfg.num_heads, self.cfg.rope_theta, dtype)

    def keys_values(self, base, input_ids, prior, attention_mask=None) -> list:
        """Each block's attention keys and values (B, heads, L, head_dim) of the whole canvas, for `forward_span`
        (a list of (k, v), one per block; for the last block only its projection is computed)."""
        _, z = self._inputs(base, input_ids, prior)
        cos, sin = self._rope(input_ids, attention_mask, z.dtype)
        key_mask = None if attention_mask is None else attention_mask.bool()
        kv = []
        for block in self.blocks[:-1]:
            z = block(z, cos, sin, key_mask, keep=kv)
        last = self.blocks[-1]
        _, k, v = last.attn.project(last.attn_norm(z), cos, sin)
        return kv + [(k, v)]

    def forward_span(self, base, input_ids, prior, attention_mask, kv: tuple, start: int, end: int) -> torch.Tensor:
        """One unroll on the rows start .. end-1 only (B, end - start, H): those rows attend to their own fresh
        keys/values and to `kv` (from `keys_values`) at every other position. With `kv` of the same canvas and
        prior, equal to forward(...)[:, start:end] up to floating-point rounding."""
        cos, sin = self._rope(input_ids, attention_mask, self.proj.weight.dtype)
        return self._rows(base, input_ids[:, start:end], prior[:, start:end], cos[:, :, start:end],
                          sin[:, :, start:end], attention_mask, kv, start)

    def forward_rows(self, base, input_ids, prior, attention_mask, kv: tuple, positions: torch.Tensor) -> torch.Tensor:
        """`forward_span` on any rows: positions (B, n) of each sequence (a repeated position is computed twice,
        the same) -> (B, n, H). The unroll of `--unroll fast` (decode.StepContext.unroll_sampler)."""
        cos, sin = self._rope(input_ids, attention_mask, self.proj.weight.dtype)
        H, hd = prior.shape[-1], cos.shape[-1]
        at = positions[:, None, :, None].expand(-1, 1, -1, hd)
        cos, sin = (t.expand(positions.shape[0], -1, -1, -1).gather(2, at) for t in (cos, sin))
        return self._rows(base, input_ids.gather(1, positions), prior.gather(1, positions[..., None].expand(-1, -1, H)),
                          cos, sin, attention_mask, kv, positions)

    def _rows(self, base, ids, prior, cos, sin, attention_mask, kv, where) -> torch.Tensor:
        """The unroll of the given rows (their tokens, prior and rotary angles) against `kv` elsewhere; `where`:
        their start (a span) or positions, as `layers.Attention.forward` takes it."""
        own, z = self._inputs(base, ids, prior)
        key_mask = None if attention_mask is None else attention_mask.bool()
        for block, layer_kv in zip(self.blocks, kv, strict=True):
            z = block(z, cos, sin, key_mask, kv=layer_kv, start=where)
        return (self.out_norm(z) + own).to(prior.dtype)

    # --- identity and persistence ------------------------------------------------------------
    def check_base(self, base) -> None:
        """Refuse a base other than the one this sampler was distilled from."""
        mine, theirs = self.cfg.base, base.identity()
        for key in ("hidden_size", "vocab_size", "fingerprint"):
            if mine.get(key) != theirs.get(key):
                raise AdjustError(f"this sampler was trained for base {mine.get('name')!r} "
                                  f"({key}={mine.get(key)}), not for {theirs.get('name')!r} "
                                  f"({key}={theirs.get(key)}); distill a sampler for this base")

    def check_decoding(self, sampling, block_length: int | None) -> None:
        """Warn (once per sampler and setting, one stderr line) when generation decodes with an order rule,
        temperature, top-p/top-k or blocks other than those of the rollouts this sampler was distilled on."""
        want = self.cfg.distilled_on
        if not want:
            return  # a sampler saved before this was recorded
        now = {"order": sampling.order, "temperature": sampling.temperature, "top_p": sampling.top_p,
               "top_k": sampling.top_k, "block_length": block_length}
        diff = tuple(sorted(k for k in now if k in want and want[k] != now[k]))
        if diff and diff not in self._warned:
            self._warned.add(diff)
            said = ", ".join(f"{k} {now[k]} (distilled with {want[k]})" for k in diff)
            print(f"adjust: warning: this sampler was distilled on rollouts decoded otherwise: {said}; "
                  "its joint may fit these settings less well", file=sys.stderr)

    def save(self, out_dir: str | Path, extra: dict | None = None, step: int | None = None) -> None:
        """Write model.safetensors, then config.json. With `step` (a training checkpoint), both record it
        and `load` refuses a pair whose steps differ (a checkpoint interrupted between the two files)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {"format": "pt", **({"step": str(step)} if step is not None else {})}
        with atomic_path(out / "model.safetensors") as tmp:
            save_file(state, str(tmp), metadata=meta)
        extra = dict(extra or {})
        if step is not None:
            extra["checkpoint_step"] = step
        write_json(out / "config.json", {"model_type": SAMPLER_TYPE, **asdict(self.cfg), **extra})

    @classmethod
    def load(cls, path: str | Path, base=None) -> "JointSampler":
        """Load a sampler; with `base`, check it belongs to that base and match its device and dtype."""
        path = Path(path)
        if not path.is_dir():
            raise AdjustError(f"sampler directory not found: {path}")
        raw = read_json(path / "config.json", "sampler config.json")
        if raw.get("model_type") != SAMPLER_TYPE:
            raise AdjustError(f"{path} is not an ADJUST sampler (model_type={raw.get('model_type')!r})")
        sampler = cls(config_from_json(SamplerConfig, raw, path / "config.json", "sampler config.json"))
        if base is not None:
            sampler.check_base(base)
        weights = path / "model.safetensors"
        load_state(sampler, load_weights(weights, "sampler weights"), path, "sampler weights")
        if "checkpoint_step" in raw:
            step = _weights_step(weights)
            if step != str(raw["checkpoint_step"]):
                raise AdjustError(f"sampler {path} mixes checkpoints: config.json is from step {raw['checkpoint_step']}, "
                                  f"model.safetensors from step {step}; rerun the same `adjust distill` to repair it")
        if base is not None:
            sampler.to(device=base.device, dtype=base.dtype)
        sampler.eval()
        return sampler


def _weights_step(path: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("step")


def default_sampler_path(base_path) -> Path | None:
    """The sampler shipped beside a base: <base dir>/sampler, if present."""
    p = Path(base_path) / "sampler"
    return p if p.is_dir() else None
