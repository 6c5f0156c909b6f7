"""Every RNG stream of a rank (Python, NumPy, torch, CUDA, megatron's tracker), saved and
restored."""

import random

import numpy as np
import torch
from megatron.core import tensor_parallel


def get_rng_state() -> dict:
    tracker_states = tensor_parallel.get_cuda_rng_tracker().get_states()
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        # Cloned: the tracker replaces, not updates, its tensors, but these are pickled later.
        # Graph-safe trackers (--cuda-graph) hold generators: their state is saved instead.
        "tracker": {
            name: s.get_state() if isinstance(s, torch.Generator) else s.clone()
            for name, s in tracker_states.items()
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tracker = tensor_parallel.get_cuda_rng_tracker()
    current = tracker.get_states()
    if all(isinstance(current.get(name), torch.Generator) for name in state["tracker"]):
        for name, saved in state["tracker"].items():
            current[name].set_state(saved)
    else:
        tracker.set_states(state["tracker"])
