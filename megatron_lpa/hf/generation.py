"""Sampling text from a causal LM with a key/value cache: greedy, temperature, top-k, top-p.

The model is any ``transformers``-style causal LM whose forward takes ``(input_ids, cache=...,
use_cache=True)`` and returns ``logits [b, s, vocab]`` and the cache (``modeling_lpa``'s
``LpaForCausalLM``). The prompt is run once; each new token then costs one step of one token.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_lpa.hf.modeling_lpa import CACHE_FIELD


@dataclass
class Sampling:
    greedy: bool = False
    """Always the most likely token (the other settings are then unused)."""
    temperature: float = 1.0
    top_k: int = 0
    """Sample among the k most likely tokens only (0: all)."""
    top_p: float = 1.0
    """Sample among the fewest most likely tokens whose probabilities sum to at least p."""


def next_token(
    logits: torch.Tensor, sampling: Sampling, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """One token ``[b]`` from the last position's logits ``[b, vocab]``."""
    if sampling.greedy:
        return logits.argmax(-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the ones before it already reach top_p; the first always stays.
        drop = probs.cumsum(-1) - probs >= sampling.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(
    model,
    prompt: list,
    max_new_tokens: int,
    sampling: Sampling,
    stop_id: int = None,
    max_length: int = None,
    generator: Optional[torch.Generator] = None,
) -> list:
    """The new token ids after ``prompt`` (ids): at most ``max_new_tokens``, ending early after
    ``stop_id`` or at ``max_length`` tokens in all (the model's positions)."""
    device = next(model.parameters()).device
    if max_length is not None:
        max_new_tokens = min(max_new_tokens, max_length - len(prompt))
    tokens = torch.tensor([prompt], device=device)
    cache, new = None, []
    for _ in range(max_new_tokens):
        output = model(tokens, cache=cache, use_cache=True)
        cache = getattr(output, CACHE_FIELD)
        token = next_token(output.logits[:, -1], sampling, generator)
        new.append(int(token))
        if new[-1] == stop_id:
            break
        tokens = token[:, None]
    return new
