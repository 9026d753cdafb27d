"""KL(p_base || q_sampler) over the vocabulary, in chunks of positions (docs/method.md section 5).

Full-vocabulary logits for whole sequences do not fit at 152k vocabulary, so both sides'
logits are made per chunk of masked positions, reduced to one number per position, and
dropped; under autograd each chunk is recomputed in the backward pass (activation
checkpointing), so peak memory holds one chunk of logits, not all of them.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_kl(base, teacher_hidden: torch.Tensor, student_hidden: torch.Tensor) -> torch.Tensor:
    t_logp = torch.log_softmax(base.logits(teacher_hidden), dim=-1)
    s_logp = torch.log_softmax(base.logits(student_hidden), dim=-1)
    p = t_logp.exp()
    # true KL, teacher-entropy term included; banned tokens have p = 0 and contribute 0
    return torch.where(p > 0, p * (t_logp - s_logp), torch.zeros_like(p)).sum(-1)


def kl_per_position(base, teacher_hidden: torch.Tensor, student_hidden: torch.Tensor,
                    chunk: int = 1024) -> torch.Tensor:
    """(N, H) teacher and student hidden states at the scored positions -> (N,) KL in nats."""
    teacher_hidden = teacher_hidden.detach()
    out = []
    for lo in range(0, teacher_hidden.shape[0], chunk):
        t, s = teacher_hidden[lo:lo + chunk], student_hidden[lo:lo + chunk]
        if s.requires_grad:
            out.append(checkpoint(_chunk_kl, base, t, s, use_reentrant=False))
        else:
            out.append(_chunk_kl(base, t, s))
    return torch.cat(out) if out else teacher_hidden.new_zeros(0)
