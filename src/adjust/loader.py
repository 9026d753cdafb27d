"""The one loader of a base model and its joint sampler.

The CLI, the evaluations (and later the server and the harness) describe what to load with a
`ModelSpec` and call `load_models`; none of them resolves paths, defaults or the sampler
beside the base on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import AdjustError

SAMPLER_MODES = ("none", "optional", "required")


@dataclass
class ModelSpec:
    """What to load: a base directory (None: the shipped default) and options; a sampler directory
    (None: `<base>/sampler` if present)."""

    base: str | None = None
    base_type: str = "auto"
    dtype: str = "float32"
    device: str = "cpu"
    remote_code: bool = False  # run Python code shipped in a model directory (Hugging Face auto_map)
    prompt_specials: bool = True  # prompts start with the special tokens the model was trained with ([CLS])
    sampler: str | None = None
    chat: bool = False  # prompts are user messages in the tokenizer's chat template (instruct models)


def load_models(spec: ModelSpec, sampler: str = "optional"):
    """(base, sampler) for `spec`. `sampler`: "none" loads none; "optional" loads the one given or the
    one beside the base if there is one; "required" refuses to go on without one."""
    from .base import default_base_path, load_base
    from .sampler import JointSampler, default_sampler_path

    if sampler not in SAMPLER_MODES:
        raise ValueError(f"sampler mode must be one of {SAMPLER_MODES}, got {sampler!r}")
    base = load_base(spec.base, spec.base_type, dtype=spec.dtype, device=spec.device, remote_code=spec.remote_code,
                     chat=spec.chat)
    base.prompt_specials = spec.prompt_specials
    if sampler == "none":
        return base, None
    path = spec.sampler or default_sampler_path(spec.base or default_base_path())
    if path is None:
        if sampler == "required":
            raise AdjustError("no joint sampler found for this base; pass --sampler DIR "
                              "(train one with `adjust distill`)")
        return base, None
    return base, JointSampler.load(path, base)
