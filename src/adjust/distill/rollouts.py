"""`adjust rollouts`: exact joint sampling trajectories of the frozen base, stored compactly.

A trajectory is its prompt, its final generated tokens and the order in which positions
were unmasked: that is enough to rebuild every intermediate state x^0 (all masked) ...
x^G (done). Samples are written in shards of safetensors; a rerun resumes after the last
complete shard, and a sample's tokens depend only on (seed, prompt, sample index), so
shards may be produced by different processes (see `shard_indices`).

A rerun with the same settings and a larger --num-samples extends the set to exactly that
many samples (the earlier partial last shard is replaced, never kept beside its successor,
and only once the new shards exist);
other settings, or fewer samples, are refused. Every setting is checked before
rollouts.json is written, and `load_rollouts` refuses a set that is incomplete, holds a
sample twice, or holds token ids outside the base's vocabulary.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..batching import group_by_length
from ..decode import check_request, generate
from ..errors import AdjustError
from ..io import (changed_settings, check_digest, check_output_dir, content_digest, load_weights, read_json,
                  save_tensors, sealed, write_json)
from ..lock import output_lock
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


def shard_ranges(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    """The [lo, hi) sample ranges of the shards of a set of `num_samples` rollouts."""
    return [(lo, min(lo + shard_size, num_samples)) for lo in range(0, num_samples, shard_size)]


def shard_name(lo: int, hi: int) -> str:
    return f"shard-{lo:08d}-{hi:08d}.safetensors"


# what each recorded setting is called on the command line (for "made with other settings")
SETTING_FLAGS = {"base": "--base", "gen_length": "--gen-length", "seed": "--seed", "shard_size": "--shard-size",
                 "sampling": "--order/--temperature/--top-p/--top-k", "prompts": "--prompt/--prompts",
                 "dtype": "--dtype", "base_digest": "--base (its weights or config.json changed)"}


def base_digest(base) -> str:
    """The digest of a base's weights (at its loaded dtype) and configuration: a resumed set refuses a base
    whose weights or config.json changed since (the embedding fingerprint sees only a slice)."""
    from dataclasses import asdict, is_dataclass

    cfg = getattr(base, "cfg", None)
    cfg = asdict(cfg) if is_dataclass(cfg) else getattr(getattr(getattr(base, "model", None), "config", None),
                                                         "to_dict", dict)()
    cfg = {k: v for k, v in sorted(cfg.items()) if not k.startswith("_")  # where it was loaded from, and when
           and k not in ("name_or_path", "torch_dtype", "dtype", "transformers_version")}
    return content_digest({"config": repr(cfg), "weights": base.state_dict()})[:32]


def _check_meta(meta: dict, path: Path) -> dict:
    """Refuse metadata missing a field or holding one of the wrong kind (nothing else is trusted)."""
    def bad(what: str):
        raise AdjustError(f"rollouts metadata {path / META} is not valid: {what}; rerun `adjust rollouts`")

    for key in ("base", "gen_length", "seed", "num_samples", "sampling", "prompts", "shard_size"):
        if key not in meta:
            bad(f"it lacks {key!r}")
    for key in ("gen_length", "num_samples", "shard_size"):
        if not isinstance(meta[key], int) or meta[key] < 1:
            bad(f"{key} must be a positive integer, not {meta[key]!r}")
    if not isinstance(meta["base"], dict) or "fingerprint" not in meta["base"]:
        bad("its base has no fingerprint")
    if not isinstance(meta["sampling"], dict):
        bad("sampling must be an object")
    prompts = meta["prompts"]
    if not isinstance(prompts, list) or not prompts or not all(
            isinstance(p, list) and all(isinstance(i, int) for i in p) for p in prompts):
        bad("prompts must be a non-empty list of token id lists")
    return meta


SHARD_REMEDY = "delete it and rerun `adjust rollouts` with the same settings (it recomputes the shard)"


def shard_range(name: str) -> tuple[int, int] | None:
    """(lo, hi) of a shard file named by `shard_name`, else None."""
    parts = name.removesuffix(".safetensors").split("-")
    if len(parts) == 3 and parts[0] == "shard" and all(p.isdigit() and len(p) == 8 for p in parts[1:]):
        return int(parts[1]), int(parts[2])
    return None


def read_shard(shard: Path, G: int) -> dict:
    """One shard's index, tokens and order, checked: its checksum, its tensors' shapes, every order row a
    permutation of 0..G-1 (whether it holds the samples its name says is the caller's check). Every failure
    is one AdjustError naming the shard and what to do."""
    part = load_weights(shard, "rollout shard", SHARD_REMEDY)
    if set(part) != {"index", "tokens", "order"}:
        raise AdjustError(f"corrupt rollout shard {shard}: holds {sorted(part)}, not index, tokens, order; "
                          + SHARD_REMEDY)
    n = part["index"].shape[0] if part["index"].dim() == 1 else -1
    if n < 0 or part["tokens"].shape != (n, G) or part["order"].shape != (n, G):
        raise AdjustError(f"corrupt rollout shard {shard}: shapes {tuple(part['index'].shape)}, "
                          f"{tuple(part['tokens'].shape)}, {tuple(part['order'].shape)} do not fit "
                          f"--gen-length {G}; {SHARD_REMEDY}")
    order = part["order"].long()
    if n and not torch.equal(order.sort(dim=1).values, torch.arange(G).expand_as(order)):
        raise AdjustError(f"corrupt rollout shard {shard}: an unmasking order does not visit every position once; "
                          + SHARD_REMEDY)
    return {"index": part["index"].long(), "tokens": part["tokens"].long(), "order": order}


def _read_shards(path: Path, meta: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(index, tokens, order) of every shard of the set, checked against the metadata: shapes, one sample per
    index 0..N-1 (no gap, no repeat, none out of range), and every order row a permutation of 0..G-1.

    A file named for a range that is not one of the set's is left out: what an interrupted extension
    wrote before the metadata took its new size (the next run finishes or deletes it)."""
    N, G = meta["num_samples"], meta["gen_length"]
    wanted = set(shard_ranges(N, meta["shard_size"]))
    index, tokens, order, misnamed = [], [], [], []
    for shard in sorted(path.glob("shard-*.safetensors")):
        named = shard_range(shard.name)
        if named is not None and named not in wanted:
            continue
        part = read_shard(shard, G)
        if named is not None and not torch.equal(part["index"], torch.arange(*named)):
            misnamed.append(shard.name)
        index.append(part["index"])
        tokens.append(part["tokens"])
        order.append(part["order"])
    index = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
    tokens = torch.cat(tokens) if tokens else torch.zeros(0, G, dtype=torch.long)
    order = torch.cat(order) if order else torch.zeros(0, G, dtype=torch.long)
    outside = int(((index < 0) | (index >= N)).sum())
    counts = torch.bincount(index[(index >= 0) & (index < N)], minlength=N)
    missing, repeated = int((counts == 0).sum()), int((counts > 1).sum())
    if missing or repeated or outside:
        absent = [shard_name(lo, hi) for lo, hi in sorted(wanted) if not (path / shard_name(lo, hi)).is_file()]
        where = "".join(f"; {what}: {', '.join(names[:3])}" + (" ..." if len(names) > 3 else "")
                        for what, names in (("missing", absent), ("holding other samples than its name says",
                                                                  misnamed)) if names)
        raise AdjustError(f"rollouts in {path} are incomplete: {missing} of {N} samples missing, {repeated} "
                          f"repeated, {outside} out of range{where}; rerun `adjust rollouts` with the same "
                          "settings to finish them")
    return index, tokens, order


def check_complete(path: str | Path, num_samples: int | None = None) -> None:
    """Refuse a rollouts directory whose shards do not hold every sample index 0..N-1 exactly once
    (N: `num_samples`, default the metadata's)."""
    path = Path(path)
    meta = read_meta(path)
    _read_shards(path, meta if num_samples is None else {**meta, "num_samples": num_samples})


def read_meta(path: Path) -> dict:
    """rollouts.json of directory `path`, checked: its checksum (an edited prompt or setting is refused)
    and its fields."""
    raw = read_json(path / META, "rollouts metadata")
    return _check_meta(check_digest(raw, path / META, "rollouts metadata",
                                    "rerun `adjust rollouts` into a new --out"), path)


def _history_to_order(history, gen_length: int) -> list[int]:
    order = [pos for step in history for pos, _, _ in step["unmasked"]]
    if sorted(order) != list(range(gen_length)):
        raise RuntimeError("an exact trajectory did not unmask every position exactly once")
    return order


def check_counts(num_samples: int, batch_size: int, shard_size: int) -> None:
    for flag, value in (("--num-samples", num_samples), ("--batch-size", batch_size), ("--shard-size", shard_size)):
        if value < 1:
            raise AdjustError(f"{flag} must be at least 1, got {value}")


def make_rollouts(base, out: str | Path, num_samples: int, gen_length: int, sampling: SamplingConfig,
                  prompts: list[str] | None = None, seed: int = 0, batch_size: int = 32,
                  shard_size: int = 256, progress: bool = True, rank: int = 0, world: int = 1,
                  barrier=None) -> Path:
    """Sample `num_samples` exact trajectories into `out` (resuming after complete shards).

    With `world` processes (`accelerate launch`), process `rank` writes shards rank, rank + world, ...
    of the index ranges [0, shard_size), [shard_size, 2 shard_size), ...; each shard is named by
    its range and a sample's tokens depend only on (seed, prompt, index), so once every process
    has finished the shards are exactly those of one process (see `check_complete`), and a rerun
    with any number of processes resumes. `barrier` (needed with several processes) waits for all
    of them: rank 0 holds the directory's lock (`adjust.lock`) and checks the settings before any
    process writes, and records the set's new size and removes what it replaces after all have
    written. Only rank 0 writes the metadata.

    A shard that is already there is checked first (checksum, shapes, its samples) and recomputed
    if it is damaged or truncated. Extending a set, rollouts.json keeps the old size until every new
    shard exists, so an interrupted extension leaves the earlier set complete and loadable, and the
    same command finishes it.
    """
    check_counts(num_samples, batch_size, shard_size)
    if world > 1 and barrier is None:
        raise ValueError("several processes need a barrier")
    out = check_output_dir(out)
    prompt_ids = [base.encode(p) for p in (prompts or [""])]
    check_request(base, prompt_ids, gen_length, None)  # every setting is checked before anything is written
    meta = {"base": base.identity(), "gen_length": gen_length, "seed": seed, "num_samples": num_samples,
            "sampling": sampling.__dict__, "prompts": prompt_ids, "shard_size": shard_size,
            "dtype": str(base.dtype).removeprefix("torch."), "base_digest": base_digest(base)}
    ranges = shard_ranges(num_samples, shard_size)
    wait = barrier or (lambda: None)
    with output_lock(out, take=rank == 0):
        if rank == 0:
            _check_rerun(out, meta)
        wait()  # no process writes before rank 0 has the lock and has checked the settings
        exact = make_strategy("exact")
        shards = [ranges[s] for s in shard_indices(0, len(ranges), rank, world)]  # this process's shards
        bar = tqdm(total=sum(hi - lo for lo, hi in shards), desc="rollouts", disable=not progress,
                   dynamic_ncols=True)
        for lo, hi in shards:
            path = out / shard_name(lo, hi)
            if path.is_file() and _sound(path, lo, hi, gen_length, bar):
                bar.update(hi - lo)
                continue
            write_shard(base, path, list(range(lo, hi)), prompt_ids, gen_length, sampling, seed, batch_size, exact,
                        bar)
        bar.close()
        wait()  # every process has written its shards
        if rank == 0:
            write_json(out / META, sealed(meta))  # the set's size, now that its shards exist
            wanted = {shard_name(lo, hi) for lo, hi in ranges}
            for stale in out.glob("shard-*.safetensors"):  # an earlier, smaller set's partial last shard
                if shard_range(stale.name) is not None and stale.name not in wanted:
                    stale.unlink()
    return out


def _check_rerun(out: Path, meta: dict) -> None:
    """Refuse a rerun into `out` with other settings or fewer samples; a new set's metadata is written now."""
    if (out / META).is_file():
        old = read_meta(out)
        # sets from before --dtype and the base's digest were recorded: those are not compared
        recorded = {"dtype": meta["dtype"], "base_digest": meta["base_digest"], **old}
        changed = changed_settings(recorded, meta, ignore=("num_samples",))
        if changed:
            raise AdjustError(f"{out} holds rollouts made with other settings "
                              f"({', '.join(SETTING_FLAGS.get(k, k) for k in changed)}); use a new --out")
        if meta["num_samples"] < old["num_samples"]:
            raise AdjustError(f"{out} holds {old['num_samples']} rollouts; --num-samples {meta['num_samples']} would "
                              f"drop some: ask for at least {old['num_samples']} to extend them, or use a new --out")
    elif any(out.glob("shard-*.safetensors")):
        raise AdjustError(f"{out} holds rollout shards but no {META}; use a new --out")
    else:
        write_json(out / META, sealed(meta))


def _sound(path: Path, lo: int, hi: int, gen_length: int, bar) -> bool:
    """Whether an existing shard is whole and holds the samples of its name; if not, it says so (it is recomputed)."""
    try:
        part = read_shard(path, gen_length)
        if torch.equal(part["index"], torch.arange(lo, hi)):
            return True
        problem = f"rollout shard {path} holds other samples than its name says"
    except AdjustError as e:
        problem = str(e).split("; delete it")[0]
    (bar.write if bar is not None else print)(f"adjust: {problem}; recomputing it", file=sys.stderr)
    return False


def write_shard(base, path: Path, indices: list[int], prompt_ids, gen_length, sampling, seed, batch_size,
                exact, bar=None) -> None:
    tokens, order, which = [], [], []
    # Batches of equal prompt length never need padding (bit-identical to unbatched decoding).
    for ns in group_by_length(indices, lambda n: len(prompt_ids[n % len(prompt_ids)])):
        for s in range(0, len(ns), batch_size):
            chunk = ns[s:s + batch_size]
            g = generate(base, [prompt_ids[n % len(prompt_ids)] for n in chunk], exact, sampling, gen_length, seed=seed,
                         sample_indices=chunk, record_history=True)
            tokens.append(g.tokens)
            order += [_history_to_order(h, gen_length) for h in g.history]
            which += chunk
            if bar is not None:
                bar.update(len(chunk))
    perm = sorted(range(len(which)), key=which.__getitem__)
    state = {"index": torch.tensor(which)[perm].int(), "tokens": torch.cat(tokens)[perm].int(),
             "order": torch.tensor(order)[perm].short()}
    save_tensors(path, state)


def load_rollouts(path: str | Path, base=None) -> Rollouts:
    """A complete rollouts directory, checked: every sample 0..N-1 exactly once, well-formed orders;
    with `base`, that they came from it and every token id is in its vocabulary."""
    path = Path(path)
    if not path.is_dir():
        raise AdjustError(f"rollouts directory not found: {path}")
    meta = read_meta(path)
    if base is not None and meta["base"]["fingerprint"] != base.identity()["fingerprint"]:
        raise AdjustError(f"rollouts in {path} were sampled from base {meta['base'].get('name')!r}, "
                          f"not from {base.name!r}")
    if not any(path.glob("shard-*.safetensors")):
        raise AdjustError(f"no rollout shards in {path}; run `adjust rollouts` first")
    index, tokens, order = _read_shards(path, meta)
    prompts = meta["prompts"]
    if base is not None:
        ids = [i for p in prompts for i in p] + ([int(tokens.min()), int(tokens.max())] if tokens.numel() else [])
        bad = [i for i in ids if not 0 <= i < base.vocab_size]
        if bad:
            raise AdjustError(f"rollouts in {path} hold token id {bad[0]}, outside the vocabulary of base "
                              f"{base.name!r} (0..{base.vocab_size - 1})")
    perm = index.argsort()
    return Rollouts([prompts[int(n) % len(prompts)] for n in index[perm]], tokens[perm], order[perm], meta)
