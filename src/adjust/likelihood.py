"""The likelihood routines: the masked-diffusion bound (training, validation, NLL) and the chain rule.

The bound. For a clean sequence x0, draw t ~ U(0, 1], mask each eligible token independently
with probability t, and score the masked tokens with the model:

    loss(x0) = E_t [ (1/t) * sum_{i masked} -log p(x0_i | x_t) ] / n_eligible

This is the standard MDLM/LLaDA objective (an upper bound on the per-token NLL in nats).

The chain rule (`chain_logprobs`). A masked LM defines, for a sequence of length L, the
probability of token i given the tokens before it with every later position masked; the product
over i is an exact joint distribution over sequences of length L (the model's left-to-right
decomposition, an any-order autoregressive reading). Its log is a sum over positions, so the sum
over any suffix is exactly that suffix's log-probability given the rest, wherever the split is:
no Monte Carlo, one row per position, batched. docs/serve.md ("Log-likelihoods") compares it with
the bound.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_diffusion_nll(base, ids: torch.Tensor, eligible: torch.Tensor | None = None,
                         attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                         t_min: float = 1e-3) -> torch.Tensor:
    """One Monte-Carlo draw of the bound, per sequence: returns (B,) nats per eligible token.

    `eligible` (B, L) marks the tokens that may be masked and are scored (default: all real
    tokens); the others (a prompt, padding) stay visible as conditioning.
    """
    B, L = ids.shape
    if eligible is None:
        eligible = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    u = torch.rand(B, 1, device=ids.device, generator=generator)
    t = t_min + (1 - t_min) * u  # (B, 1), mask ratio in (0, 1]
    masked = (torch.rand(B, L, device=ids.device, generator=generator) < t) & eligible
    x_t = torch.where(masked, torch.full_like(ids, base.mask_id), ids)
    hidden = base.hidden_states(x_t, attention_mask)
    logits = base.logits(hidden[masked])  # only masked positions pay for the LM head
    ce = F.cross_entropy(logits, ids[masked], reduction="none")  # (n_masked,)
    per_token = torch.zeros(B, L, device=ids.device, dtype=ce.dtype)
    per_token[masked] = ce
    weighted = per_token.sum(1) / t.squeeze(1)  # (B,), 1/t weighting
    return weighted / eligible.sum(1).clamp(min=1)


@torch.no_grad()
def estimate_nll(base, ids: torch.Tensor, eligible: torch.Tensor | None = None, attention_mask=None,
                 draws: int = 8, seed: int = 0) -> torch.Tensor:
    """Average of `draws` independent draws of the bound, per sequence (B,), reproducible by seed."""
    g = torch.Generator(device=ids.device).manual_seed(seed)
    total = torch.zeros(ids.shape[0], device=ids.device)
    for _ in range(draws):
        total += masked_diffusion_nll(base, ids, eligible, attention_mask, generator=g).float()
    return total / draws



@torch.no_grad()
def estimate_logprob(base, ids: torch.Tensor, eligible: torch.Tensor, draws: int = 128, seed: int = 0,
                     batch_size: int = 32) -> float:
    """Log-likelihood lower bound of one sequence's eligible tokens, summed, in nats (the way LLaDA's
    evaluation scores a continuation): `draws` draws of the bound, `batch_size` copies of the sequence
    per forward pass. ids, eligible: (L,). Depends only on (the sequence, seed, draws, batch_size),
    never on other sequences."""
    g = torch.Generator(device=ids.device).manual_seed(seed)
    total = 0.0
    for start in range(0, draws, batch_size):
        n = min(batch_size, draws - start)
        total += float(masked_diffusion_nll(base, ids[None].expand(n, -1), eligible[None].expand(n, -1),
                                            generator=g).double().sum())
    return -total / draws * int(eligible.sum())


@torch.no_grad()
def chain_logprobs(base, ids: list[int], start: int = 0, top: int = 0, batch_size: int = 16, stop: int | None = None):
    """log p(ids[i] | ids[:i], positions i.. masked) for i = start .. stop-1 (default: to the end; the chain rule
    above).

    Returns (logprobs (n,), top_ids (n, top), top_logprobs (n, top)) on the CPU, float32: each position's
    value and its `top` most likely tokens. `batch_size` rows (one per position) per forward pass; a value
    depends only on `ids` and its position, never on the batch."""
    L = len(ids)
    x = torch.tensor(ids, dtype=torch.long, device=base.device)
    positions = torch.arange(start, L if stop is None else stop, device=base.device)
    values, top_ids, top_logp = [], [], []
    for chunk in positions.split(max(1, batch_size)):
        rows = x.expand(len(chunk), L).clone()
        rows[torch.arange(L, device=x.device)[None] >= chunk[:, None]] = base.mask_id
        hidden = base.hidden_states(rows)[torch.arange(len(chunk), device=x.device), chunk]
        logp = torch.log_softmax(base.logits(hidden).float(), dim=-1)
        values.append(logp.gather(1, x[chunk][:, None])[:, 0])
        t = logp.topk(min(top, logp.shape[-1]), dim=-1)
        top_ids.append(t.indices)
        top_logp.append(t.values)
    if not values:
        return torch.zeros(0), torch.zeros((0, top), dtype=torch.long), torch.zeros((0, top))
    return torch.cat(values).cpu(), torch.cat(top_ids).cpu(), torch.cat(top_logp).cpu()
