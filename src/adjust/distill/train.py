"""`adjust distill`: train the joint sampler on windows of exact trajectories (docs/method.md section 5).

One example: a trajectory n, a start step t and an unroll count U.
  h        = base(x^t)                                    frozen, no grad
  prior_j  = sampler(x^{t+j}, prior_{j-1}), j = 1..U      teacher forcing, prior_0 = h
  loss     = mean over positions masked in x^{t+U} of KL(p_base(. | x^{t+U}) || q(prior_U))
Only the last unroll is penalised and gradients flow through the chain. U is drawn with
probability proportional to softmax(0.5^0, 0.5^1, ...) over 1..U_max, where U_max grows
from 1 to `max_unrolls` during the first `curriculum` fraction of training.

Window draw: uniform over (n, t) by default. With `entropy_windows` = F > 0, a share F of the
draw is instead proportional to the base's entropy over the U tokens the window writes
(`step_entropies`). What the sampler can learn from a window is how the tokens written in it
change the rest, and that information is at most their entropy: a window of tokens the base
was sure of (EOS padding, say) teaches nothing. The held-out KL `val_kl` keeps the uniform
draw; `val_kl_uncertain` is measured on held-out windows drawn by entropy alone.

Cached base states (`cache_base_states`, `--cache-base-states`): the frozen base's hidden states
at every step of every rollout are computed once, before training (as costly as the rollouts
themselves: one full pass per step), and kept in CPU memory; every training window then reads
its prior and its target from them instead of running the base twice. For a small base this
makes a step the sampler's cost alone. The states are those of batched passes, so they may
differ from a fresh pass by kernel rounding; memory is G x L x H values per rollout, and a set
that would not fit in the memory available is refused.

Precision: with a bfloat16 or float16 base (`--dtype`), the base runs in that dtype and the
sampler keeps float32 weights (the optimizer's master weights, with float32 Adam moments):
it computes in float32 on the base's hidden states cast up, and hands its output back in the
base's dtype, so each unroll's prior is what generation with a low-precision sampler sees.
The KL is computed on float32 log-probabilities. No autocast and no loss scaling are needed:
gradients reach the float32 weights in float32. The saved sampler is float32; loading it for
a base casts it to the base's dtype.

Checkpoints and resume: every `eval_every` steps, `distill_state.pt` (sampler, optimizer, step,
history and every setting; read back with torch.load(weights_only=True), no pickle) is written
atomically first, then the sampler's model.safetensors and config.json, both naming the step.
A resume reads only the state and rewrites the sampler files from it, so an interruption
between files is repaired; `JointSampler.load` refuses a pair from different steps. A resume
with other settings (any but --steps and --eval-every, the rollouts, --dtype) is refused,
naming them; with the same settings it gives the sampler of an uninterrupted run. --steps may
be raised to extend a run: the learning-rate schedule and the unroll curriculum keep the shape
of the --steps the run started with, and the steps past it run at their final values; a
--steps below the saved step, or below the one the run started with, is refused. The state
records the digest of its content, checked on resume (`adjust.io.save_state`).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..batching import group_by_length
from ..errors import AdjustError
from ..io import changed_settings, check_output_dir, load_state, load_state_file, save_state
from ..sampler import JointSampler, SamplerConfig
from ..splits import HELD_OUT_FRACTION, held_out_split
from ..lock import output_lock
from ..train_base import check_steps, lr_at, schedule
from .loss import kl_per_position
from .rollouts import Rollouts

STATE_FILE = "distill_state.pt"
# settings a resumed run may change: they decide how long it trains and how often it checkpoints
RESUMABLE = ("steps", "eval_every")


@dataclass
class DistillConfig:
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3  # paper: 5e-5 for a 7B base; a tiny fresh layer takes a larger step
    warmup: int = 100  # paper: 250, then constant
    min_lr_ratio: float = 1.0  # 1 = constant after warm-up (the paper); below 1, cosine decay to this share of lr
    grad_clip: float = 1.0
    max_unrolls: int = 3  # K - 1 for the largest K the sampler will serve
    curriculum: float = 0.3  # fraction of steps over which U_max grows from 1 to max_unrolls
    val_fraction: float = HELD_OUT_FRACTION
    val_examples: int = 128
    eval_every: int = 100
    kl_chunk: int = 1024
    entropy_windows: float = 0.0  # share of windows drawn in proportion to their tokens' entropy
    cache_base_states: bool = False  # compute the base's states of every rollout step once (small bases)
    seed: int = 0


def unroll_probs(u_max: int) -> torch.Tensor:
    """P(U = u), u = 1..u_max, proportional to softmax(0.5^0, 0.5^1, ...): short chains more often."""
    return torch.softmax(torch.tensor([0.5 ** i for i in range(u_max)]), dim=0)


def current_u_max(step: int, cfg: DistillConfig) -> int:
    ramp = max(1, int(cfg.curriculum * cfg.steps))
    return max(1, min(cfg.max_unrolls, 1 + (cfg.max_unrolls * step) // ramp))


def split(rollouts: Rollouts, cfg: DistillConfig) -> tuple[list[int], list[int]]:
    """Held-out split by trajectory: the rule of `adjust.splits.held_out_split` (eval joint-kl uses it too)."""
    return held_out_split(len(rollouts), cfg.val_fraction)


def by_prompt_length(rollouts: Rollouts, pool: list[int]) -> list[list[int]]:
    """The trajectories of `pool` grouped by prompt length (one batch stacks one group)."""
    return group_by_length(pool, lambda n: len(rollouts.prompts[n]))


def draw_examples(rollouts: Rollouts, pool: list[int], batch: int, u: int, g: torch.Generator):
    """Trajectories (one prompt length) and start steps t with t + u <= G - 1 (a mask is left to score)."""
    groups = by_prompt_length(rollouts, pool)
    sizes = torch.tensor([len(x) for x in groups], dtype=torch.float)
    group = groups[int(torch.multinomial(sizes, 1, generator=g))]
    ns = [group[i] for i in torch.randint(len(group), (batch,), generator=g).tolist()]
    ts = torch.randint(0, rollouts.gen_length - u, (batch,), generator=g).tolist()
    return ns, ts


def rollout_steps(rollouts: Rollouts, batch_size: int):
    """Batches (ns, ss) of (rollout, step) pairs covering every step of every rollout, one prompt length each."""
    for group in by_prompt_length(rollouts, list(range(len(rollouts)))):
        pairs = [(n, s) for n in group for s in range(rollouts.gen_length)]
        for lo in range(0, len(pairs), batch_size):
            ns, ss = zip(*pairs[lo:lo + batch_size])
            yield list(ns), list(ss)


class BaseStates:
    """The frozen base's hidden states at steps 0..G-1 of every rollout, computed once, kept on the CPU."""

    def __init__(self, base, rollouts: Rollouts, batch_size: int = 64, progress: bool = True):
        import psutil

        G, H = rollouts.gen_length, base.hidden_size
        itemsize = torch.empty((), dtype=base.dtype).element_size()
        need = sum(G * (len(p) + G) * H * itemsize for p in rollouts.prompts)
        free = psutil.virtual_memory().available
        if need > 0.8 * free:
            raise AdjustError(f"--cache-base-states needs {need / 2**30:.1f} GiB for these rollouts, but only "
                              f"{free / 2**30:.1f} GiB of memory is free; run without it")
        self.states = [torch.empty(G, len(p) + G, H, dtype=base.dtype) for p in rollouts.prompts]
        bar = tqdm(total=len(rollouts) * G, desc="base states", disable=not progress, dynamic_ncols=True)
        with torch.no_grad():
            for ns, ss in rollout_steps(rollouts, batch_size):
                hidden = base.hidden_states(rollouts.states(ns, ss, base.mask_id).to(base.device)).cpu()
                for i, (n, s) in enumerate(zip(ns, ss)):
                    self.states[n][s] = hidden[i]
                bar.update(len(ns))
        bar.close()

    def get(self, ns, ts, device) -> torch.Tensor:
        """(B, L, H): the base's hidden states of x^t for each (n, t), on `device`."""
        return torch.stack([self.states[n][t] for n, t in zip(ns, ts)]).to(device)


def step_entropies(base, rollouts: Rollouts, batch_size: int = 256, progress: bool = True,
                   cached: BaseStates | None = None) -> torch.Tensor:
    """(N, G): entropy (nats) of the distribution each rollout step drew its token from.

    Entry [n, s] is the entropy at position order[n, s] of the base's distribution at x^s, under
    the rollouts' own sampling settings. One base pass per step: as costly as the rollouts
    (free with `cached` states).
    """
    from ..sampling import SamplingConfig, entropy, log_probs

    sampling = SamplingConfig(**rollouts.meta["sampling"])
    out = torch.zeros(len(rollouts), rollouts.gen_length)
    bar = tqdm(total=out.numel(), desc="step entropies", disable=not progress, dynamic_ncols=True)
    with torch.no_grad():
        for ns, ss in rollout_steps(rollouts, batch_size):
            cols = len(rollouts.prompts[ns[0]]) + rollouts.order[ns, ss].to(base.device)
            if cached is not None:
                states = cached.get(ns, ss, base.device)
            else:
                states = base.hidden_states(rollouts.states(ns, ss, base.mask_id).to(base.device))
            hidden = states[torch.arange(len(ns), device=base.device), cols]
            out[ns, ss] = entropy(log_probs(base.logits(hidden), sampling)).float().cpu()
            bar.update(len(ns))
    bar.close()
    return out


def window_weights(step_entropy: torch.Tensor, u: int, share: float) -> torch.Tensor:
    """(N, G - u) draw probabilities of windows (n, t) writing steps t..t+u-1: a mixture of the
    uniform draw (1 - share) and one proportional to the entropy of the window's tokens (share)."""
    h = step_entropy.clamp_min(0).unfold(1, u, 1).sum(-1)[:, : step_entropy.shape[1] - u]
    uniform = torch.full_like(h, 1.0 / h.numel())
    if share <= 0 or h.sum() <= 0:
        return uniform
    return (1 - share) * uniform + share * h / h.sum()


def draw_weighted(rollouts: Rollouts, pool: list[int], batch: int, weights: torch.Tensor, g: torch.Generator):
    """Like `draw_examples`, with windows (n, t) drawn by `weights` (one prompt length per batch)."""
    groups = by_prompt_length(rollouts, pool)
    mass = torch.stack([weights[grp].sum() for grp in groups])
    if not mass.sum() > 0:  # no weight on this pool (every window certain): the uniform draw
        return draw_examples(rollouts, pool, batch, rollouts.gen_length - weights.shape[1], g)
    group = groups[int(torch.multinomial(mass, 1, generator=g))]
    w = weights[group]  # (len(group), G - u)
    picks = torch.multinomial(w.flatten(), batch, replacement=True, generator=g)
    return [group[i] for i in (picks // w.shape[1]).tolist()], (picks % w.shape[1]).tolist()


def distilled_on(rollouts: Rollouts) -> dict:
    """The decoding settings of the rollouts (recorded in the sampler's config): one block, always."""
    s = rollouts.meta["sampling"]
    return {"order": s.get("order"), "temperature": s.get("temperature"), "top_p": s.get("top_p"),
            "top_k": s.get("top_k"), "block_length": None}


def _describe_change(key: str, was, now) -> str:
    if key == "rollouts":
        return "--rollouts (another set of rollouts)"
    if key == "sampler_config":
        return "the sampler's size (--sampler-arch, --sampler-layers) or base"
    return f"--{key.replace('_', '-')} was {was}, now {now}"


def example_loss(base, sampler, rollouts: Rollouts, ns, ts, u: int, chunk: int,
                 normalizer: int | None = None, cached: BaseStates | None = None) -> torch.Tensor:
    """Mean KL over the positions still masked in x^{t+u} (docs/method.md section 5).

    With `normalizer`: the KL summed over those positions, divided by `normalizer` (a count of
    positions over a larger batch, of which ns/ts are one process's slice). With `sampler=None`
    the prior is never updated: the KL of the full pass's marginals, i.e. of parallel decoding,
    the baseline a sampler has to beat. With `cached` base states the base does not run.
    """
    device = base.device
    states = [rollouts.states(ns, [t + j for t in ts], base.mask_id).to(device) for j in range(u + 1)]
    if cached is not None:
        prior, target = cached.get(ns, ts, device), cached.get(ns, [t + u for t in ts], device)
    else:
        with torch.no_grad():
            prior = base.hidden_states(states[0])
            target = base.hidden_states(states[u])
    for j in range(1, u + 1) if sampler is not None else ():
        # in the base's dtype, as in generation (accelerate's mixed precision hands outputs back in float32)
        prior = sampler(base, states[j], prior).to(target.dtype)
    masked = states[u] == base.mask_id
    kl = kl_per_position(base, target[masked], prior[masked], chunk)
    return kl.mean() if normalizer is None else kl.sum() / normalizer


def distill(base, rollouts: Rollouts, out: str | Path, cfg: DistillConfig, sampler_cfg: SamplerConfig | None = None,
            progress: bool = True, accelerator=None) -> dict:
    """Train (or resume) a sampler for `base` into `out`. Returns the final metrics.

    One run at a time writes `out`: the main process holds its lock (`adjust.lock.output_lock`)."""
    out = check_output_dir(out)
    with output_lock(out, take=accelerator is None or accelerator.is_main_process):
        if accelerator is not None:
            accelerator.wait_for_everyone()  # the others start once the main process holds the lock
        return _distill(base, rollouts, out, cfg, sampler_cfg, progress, accelerator)


def _check_base_unchanged(base, rollouts: Rollouts) -> None:
    """Refuse a base whose weights or config.json changed since the rollouts were drawn from it (the embedding
    fingerprint sees only a slice): its rollouts are another model's samples. Compared when the rollouts
    recorded the digest and the base is loaded whole in the dtype they were drawn with (the digest is of the
    loaded weights; a base sharded over processes holds only its part of them)."""
    from .rollouts import base_digest

    meta = rollouts.meta
    whole = all(type(t) is torch.Tensor for t in base.state_dict().values())
    if meta.get("base_digest") and whole and meta.get("dtype") == str(base.dtype).removeprefix("torch."):
        if base_digest(base) != meta["base_digest"]:
            raise AdjustError(f"--base {base.name}: its weights or config.json changed since these rollouts were "
                              "drawn from it; draw new rollouts (adjust rollouts) or use the base they came from")


def _distill(base, rollouts: Rollouts, out: Path, cfg: DistillConfig, sampler_cfg, progress, accelerator) -> dict:
    if rollouts.meta["base"]["fingerprint"] != base.identity()["fingerprint"]:
        raise AdjustError(f"these rollouts came from base {rollouts.meta['base'].get('name')!r}, not {base.name!r}")
    _check_base_unchanged(base, rollouts)
    if cfg.max_unrolls < 1 or cfg.max_unrolls > rollouts.gen_length - 1:
        raise AdjustError(f"--max-unrolls must be in 1..{rollouts.gen_length - 1} for rollouts of length "
                          f"{rollouts.gen_length}, got {cfg.max_unrolls}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise AdjustError(f"--min-lr-ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if not 0 <= cfg.entropy_windows <= 1:
        raise AdjustError(f"--entropy-windows must be in [0, 1], got {cfg.entropy_windows}")
    train_ids, val_ids = split(rollouts, cfg)
    if not train_ids or not val_ids:
        raise AdjustError("need at least 2 rollouts (one to train on, one held out)")
    torch.manual_seed(cfg.seed)
    sampler_cfg = sampler_cfg or SamplerConfig.for_base(base)
    sampler_cfg.distilled_on = distilled_on(rollouts)
    # float32 master weights whatever the base's dtype (see the module docstring)
    sampler = JointSampler(sampler_cfg).to(device=base.device, dtype=torch.float32)
    opt = torch.optim.AdamW(sampler.parameters(), lr=cfg.lr, weight_decay=0.0)  # paper: no weight decay
    step, elapsed, history, ema, extra = 0, 0.0, [], None, None
    settings = {**asdict(cfg), "rollouts": rollouts.meta, "dtype": str(base.dtype).removeprefix("torch."),
                "sampler_config": asdict(sampler_cfg), "schedule_steps": cfg.steps}
    state_path = out / STATE_FILE
    if state_path.is_file():
        state = load_state_file(state_path, "distill state", ("sampler", "optimizer", "step", "elapsed", "history",
                                                              "settings", "ema", "extra"))
        saved = {"schedule_steps": state["settings"].get("steps"), **state["settings"]}  # recorded since
        check_steps(cfg.steps, state["step"], saved["schedule_steps"], out)
        settings["schedule_steps"] = saved["schedule_steps"]
        if isinstance(saved.get("sampler_config"), dict):  # a state from before a field existed: its default
            import dataclasses

            defaults = {f.name: f.default for f in dataclasses.fields(SamplerConfig)
                        if f.name in SamplerConfig.OPTIONAL_FIELDS and f.default is not dataclasses.MISSING}
            saved["sampler_config"] = {**defaults, **saved["sampler_config"]}
        changed = changed_settings(saved, settings, ignore=RESUMABLE)
        if changed:
            raise AdjustError(f"{out} holds a distill run with other settings: "
                              + "; ".join(_describe_change(k, state["settings"].get(k), settings.get(k)) for k in changed)
                              + "; rerun with the same settings or use a new --out")
        load_state(sampler, state["sampler"], state_path, "sampler weights")
        opt.load_state_dict(state["optimizer"])
        step, elapsed, history, ema, extra = (state["step"], state["elapsed"], state["history"], state["ema"],
                                              state["extra"])
        print(f"resuming from step {step} in {out}", file=sys.stderr)
        if accelerator is None or accelerator.is_main_process:
            sampler.save(out, extra=extra, step=step)  # the sampler files of this state (repairs a cut checkpoint)
    model, optim = sampler, opt
    if accelerator is not None:
        model, optim = accelerator.prepare(sampler, opt)

    main_bar = progress and (accelerator is None or accelerator.is_main_process)
    cached = BaseStates(base, rollouts, progress=main_bar) if cfg.cache_base_states else None
    step_h = step_entropies(base, rollouts, progress=main_bar, cached=cached) if cfg.entropy_windows > 0 else None
    train_weights = {} if step_h is None else {u: window_weights(step_h, u, cfg.entropy_windows)
                                                for u in range(1, cfg.max_unrolls + 1)}
    val_g = torch.Generator().manual_seed(cfg.seed + 1)
    probs = unroll_probs(cfg.max_unrolls)

    def held_out(weighted: bool) -> list:
        batches = []
        for _ in range(max(1, cfg.val_examples // cfg.batch_size)):
            u, n = int(torch.multinomial(probs, 1, generator=val_g)) + 1, min(cfg.batch_size, cfg.val_examples)
            draw = draw_weighted(rollouts, val_ids, n, window_weights(step_h, u, 1.0), val_g) if weighted \
                else draw_examples(rollouts, val_ids, n, u, val_g)
            batches.append((*draw, u))
        return batches

    # held-out windows: uniform (val_kl), and with entropy windows also those drawn in proportion to
    # their tokens' entropy (val_kl_uncertain: where the sampler has something to learn)
    val_sets = {"val_kl": held_out(False), **({"val_kl_uncertain": held_out(True)} if step_h is not None else {})}

    def validate(with_sampler: bool = True) -> dict:
        sampler.eval()
        with torch.no_grad():
            kls = {name: sum(example_loss(base, sampler if with_sampler else None, rollouts, ns, ts, u,
                                          cfg.kl_chunk, cached=cached).item() for ns, ts, u in batches) / len(batches)
                   for name, batches in val_sets.items()}
        sampler.train()
        return {name: round(kl, 5) for name, kl in kls.items()}

    parallel = {f"{name}_parallel": kl for name, kl in validate(with_sampler=False).items()}  # the same windows, no sampler

    def checkpoint(val: dict):
        if accelerator is not None and not accelerator.is_main_process:
            return
        extra = {"training": {"step": step, **val, **parallel, "rollouts": rollouts.meta.get("num_samples"),
                              "gen_length": rollouts.gen_length, "max_unrolls": cfg.max_unrolls,
                              "entropy_windows": cfg.entropy_windows}}
        # the resume state first (the truth), then the sampler files, each naming the step
        save_state(state_path, {"sampler": sampler.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                "elapsed": elapsed, "history": history, "ema": ema, "extra": extra,
                                "settings": settings})
        sampler.save(out, extra=extra, step=step)

    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    if cfg.batch_size < world:
        raise AdjustError(f"--batch-size {cfg.batch_size} is smaller than the {world} processes; each needs examples")
    sampler.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="distill", dynamic_ncols=True,
               disable=not progress or rank != 0)
    t0 = time.time() - elapsed
    plan = schedule(cfg, settings["schedule_steps"])  # a raised --steps extends at the schedule's end
    while step < cfg.steps:
        # every process draws the same global batch and takes its own slice: the same data as one process
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        u_max = current_u_max(step, plan)
        u = int(torch.multinomial(unroll_probs(u_max), 1, generator=g)) + 1
        if step_h is None:
            ns_all, ts_all = draw_examples(rollouts, train_ids, cfg.batch_size, u, g)
        else:
            ns_all, ts_all = draw_weighted(rollouts, train_ids, cfg.batch_size, train_weights[u], g)
        ns, ts = ns_all[rank::world], ts_all[rank::world]
        lr = lr_at(step, plan)
        for group in optim.param_groups:
            group["lr"] = lr
        if world == 1:
            loss = example_loss(base, model, rollouts, ns, ts, u, cfg.kl_chunk, cached=cached)
        else:
            # This slice's KL summed, over the whole batch's count of scored positions (x^{t+u} has
            # G - t - u masks): the slices' parts add up to the full batch's mean KL. DDP averages
            # gradients over processes, so each backpropagates world * part: the averaged gradient is
            # the full-batch gradient of one process, whatever the slices' sizes and mask counts.
            part = example_loss(base, model, rollouts, ns, ts, u, cfg.kl_chunk,
                                normalizer=sum(rollouts.gen_length - t - u for t in ts_all), cached=cached)
            loss = accelerator.reduce(part.detach().clone(), "sum")  # the full batch's mean KL (log, divergence)
        if not torch.isfinite(loss):
            raise AdjustError(f"distillation diverged at step {step} (KL {loss.item()}); lower --lr")
        optim.zero_grad(set_to_none=True)
        if accelerator is not None:
            accelerator.backward(loss if world == 1 else part * world)
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(sampler.parameters(), cfg.grad_clip)
        optim.step()
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.update(1)
        bar.set_postfix(kl=f"{ema:.4f}", u_max=u_max)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val = validate()
            elapsed = time.time() - t0
            history.append({"step": step, "train_kl": round(ema, 5), **val, "u_max": u_max,
                            "elapsed_s": round(elapsed, 1)})
            if rank == 0:
                bar.write(json.dumps(history[-1]), file=sys.stderr)
            checkpoint(val)
    bar.close()
    return {**(history[-1] if history else {"step": step}), **parallel, "params": sum(p.numel() for p in sampler.parameters()),
            "train_rollouts": len(train_ids), "val_rollouts": len(val_ids)}
