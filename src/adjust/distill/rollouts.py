"""`adjust rollouts`: exact joint sampling trajectories of the frozen base, stored compactly.

A trajectory is its prompt, its final generated tokens and the order in which positions
were unmasked: that is enough to rebuild every intermediate state x^0 (all masked) ...
x^G (done). Samples are written in shards of safetensors; a rerun resumes after the last
complete shard, and a sample's tokens depend only on (seed, prompt, sample index), so
shards may be produced by different processes (see `shard_indices`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..decode import generate
from ..errors import AdjustError
from ..io import atomic_path, load_weights, read_json, write_json
from ..sampling import SamplingConfig
from ..strategies import make_strategy

META = "rollouts.json"


@dataclass
class Rollouts:
    """Trajectories held in memory: prompts (list of id lists), tokens (N, G), order (N, G)."""

    prompts: list[list[int]]
    tokens: torch.Tensor  # (N, G) final generated ids
    order: torch.Tensor  # (N, G) order[n, s] = generation position unmasked at step s
    meta: dict

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def gen_length(self) -> int:
        return self.tokens.shape[1]

    def state(self, n: int, t: int, mask_id: int) -> torch.Tensor:
        """x^t of trajectory n: prompt + generation with the first t unmasked positions revealed."""
        gen = torch.full((self.gen_length,), mask_id, dtype=torch.long)
        shown = self.order[n, :t].long()
        gen[shown] = self.tokens[n, shown].long()
        return torch.cat([torch.tensor(self.prompts[n], dtype=torch.long), gen])

    def states(self, ns: list[int], ts: list[int], mask_id: int) -> torch.Tensor:
        """A batch of states (B, P + G); all prompts in one call must have equal length."""
        out = [self.state(n, t, mask_id) for n, t in zip(ns, ts)]
        if len({len(o) for o in out}) != 1:
            raise ValueError("states() needs trajectories whose prompts have equal length")
        return torch.stack(out)


def shard_indices(start: int, stop: int, rank: int, world: int) -> list[int]:
    return list(range(start + rank, stop, world))


def check_complete(path: str | Path, num_samples: int) -> None:
    """Refuse a rollouts directory whose shards do not hold every sample index 0..num_samples-1 exactly once."""
    index = torch.cat([load_weights(s, "rollout shard")["index"].long()
                       for s in sorted(Path(path).glob("shard-*.safetensors"))] or [torch.zeros(0, dtype=torch.long)])
    counts = torch.bincount(index, minlength=num_samples)
    missing, repeated = int((counts[:num_samples] == 0).sum()), int((counts > 1).sum())
    if missing or repeated or len(counts) > num_samples:
        raise AdjustError(f"rollouts in {path} are incomplete: {missing} of {num_samples} samples missing, "
                          f"{repeated} repeated, {max(0, len(counts) - num_samples)} out of range")


def _history_to_order(history, gen_length: int) -> list[int]:
    order = [pos for step in history for pos, _, _ in step["unmasked"]]
    if sorted(order) != list(range(gen_length)):
        raise RuntimeError("an exact trajectory did not unmask every position exactly once")
    return order


def make_rollouts(base, out: str | Path, num_samples: int, gen_length: int, sampling: SamplingConfig,
                  prompts: list[str] | None = None, seed: int = 0, batch_size: int = 32,
                  shard_size: int = 256, progress: bool = True, rank: int = 0, world: int = 1) -> Path:
    """Sample `num_samples` exact trajectories into `out` (resuming after complete shards).

    With `world` processes (`accelerate launch`), process `rank` writes shards rank, rank + world, ...
    of the index ranges [0, shard_size), [shard_size, 2 shard_size), ...; each shard is named by
    its range and a sample's tokens depend only on (seed, prompt, index), so once every process
    has finished the shards are exactly those of one process (see `check_complete`), and a rerun
    with any number of processes resumes. Only rank 0 writes the metadata.
    """
    if num_samples < 1:
        raise AdjustError(f"--num-samples must be at least 1, got {num_samples}")
    out = Path(out)
    prompt_ids = [base.encode(p) for p in (prompts or [""])]
    meta = {"base": base.identity(), "gen_length": gen_length, "seed": seed, "num_samples": num_samples,
            "sampling": sampling.__dict__, "prompts": prompt_ids, "shard_size": shard_size}
    if (out / META).is_file():
        old = read_json(out / META, "rollouts metadata")
        same = {k: old.get(k) for k in meta if k != "num_samples"} == {k: v for k, v in meta.items() if k != "num_samples"}
        if not same:
            raise AdjustError(f"{out} holds rollouts made with other settings; use a new --out")
    if rank == 0:
        write_json(out / META, meta)
    exact = make_strategy("exact")
    starts = range(0, num_samples, shard_size)
    shards = [starts[s] for s in shard_indices(0, len(starts), rank, world)]  # this process's shards
    bar = tqdm(total=sum(min(shard_size, num_samples - lo) for lo in shards), desc="rollouts",
               disable=not progress, dynamic_ncols=True)
    for lo in shards:
        hi = min(lo + shard_size, num_samples)
        path = out / f"shard-{lo:08d}-{hi:08d}.safetensors"
        if path.is_file():
            bar.update(hi - lo)
            continue
        write_shard(base, path, list(range(lo, hi)), prompt_ids, gen_length, sampling, seed, batch_size, exact, bar)
    bar.close()
    return out


def write_shard(base, path: Path, indices: list[int], prompt_ids, gen_length, sampling, seed, batch_size,
                exact, bar=None) -> None:
    from safetensors.torch import save_file

    tokens, order, which = [], [], []
    # Group by prompt so that batches never need padding (bit-identical to unbatched decoding).
    by_prompt: dict[int, list[int]] = {}
    for n in indices:
        by_prompt.setdefault(n % len(prompt_ids), []).append(n)
    for p, ns in by_prompt.items():
        for s in range(0, len(ns), batch_size):
            chunk = ns[s:s + batch_size]
            g = generate(base, [prompt_ids[p]] * len(chunk), exact, sampling, gen_length, seed=seed,
                         sample_indices=chunk, record_history=True)
            tokens.append(g.tokens)
            order += [_history_to_order(h, gen_length) for h in g.history]
            which += chunk
            if bar is not None:
                bar.update(len(chunk))
    perm = sorted(range(len(which)), key=which.__getitem__)
    state = {"index": torch.tensor(which)[perm].int(), "tokens": torch.cat(tokens)[perm].int(),
             "order": torch.tensor(order)[perm].short()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def load_rollouts(path: str | Path, base=None) -> Rollouts:
    """All complete shards of a rollouts directory; with `base`, check they came from it."""
    path = Path(path)
    if not path.is_dir():
        raise AdjustError(f"rollouts directory not found: {path}")
    meta = read_json(path / META, "rollouts metadata")
    if base is not None and meta["base"]["fingerprint"] != base.identity()["fingerprint"]:
        raise AdjustError(f"rollouts in {path} were sampled from base {meta['base'].get('name')!r}, "
                          f"not from {base.name!r}")
    shards = sorted(path.glob("shard-*.safetensors"))
    if not shards:
        raise AdjustError(f"no rollout shards in {path}; run `adjust rollouts` first")
    parts = [load_weights(s, "rollout shard") for s in shards]
    index = torch.cat([p["index"] for p in parts]).long()
    perm = index.argsort()
    prompts = meta["prompts"]
    return Rollouts([prompts[int(n) % len(prompts)] for n in index[perm]],
                    torch.cat([p["tokens"] for p in parts])[perm].long(),
                    torch.cat([p["order"] for p in parts])[perm].long(), meta)
