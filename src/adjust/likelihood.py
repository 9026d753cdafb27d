"""The one likelihood routine: the masked-diffusion bound, used for training, validation and NLL.

For a clean sequence x0, draw t ~ U(0, 1], mask each eligible token independently with
probability t, and score the masked tokens with the model:

    loss(x0) = E_t [ (1/t) * sum_{i masked} -log p(x0_i | x_t) ] / n_eligible

This is the standard MDLM/LLaDA objective (an upper bound on the per-token NLL in nats).
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
