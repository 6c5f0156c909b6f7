"""Named model shapes and the four variants as ``pretrain_gpt.py`` flags.

One definition for the tools that compare variants at a fixed shape (``tools/bench_train.py``,
``tools/parallel_numerics.py``, ``tools/wiki_experiment.py``); full runs with their schedules are
the YAML files in ``examples/configs/``.
"""

from dataclasses import dataclass
from typing import Optional

LLAMA_STYLE = ["--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
               "--disable-bias-linear", "--untie-embeddings-and-output-weights"]

VARIANTS = ("dense", "lpa", "lowrank_ffn", "lowrank_all")


@dataclass(frozen=True)
class Shape:
    """A LLaMA-style model size and the ranks its low-rank variants use."""

    flags: tuple
    attn_rank: int
    """LPA's rank of every attention projection."""
    ffn_rank: int
    """Rank of every FFN projection in the low-rank-FFN ablations."""


def _llama(layers: int, hidden: int, heads: int, ffn: int, seq: int) -> tuple:
    return tuple(LLAMA_STYLE + ["--num-layers", str(layers), "--hidden-size", str(hidden),
                                "--num-attention-heads", str(heads), "--ffn-hidden-size", str(ffn),
                                "--seq-length", str(seq)])


SHAPES = {
    # The paper's 130M setting (d768, 12 layers, FFN 2048, seq 256, untied head).
    "130m": Shape(_llama(12, 768, 12, 2048, 256), attn_rank=128, ffn_rank=384),
    # Our 3B: 3.37B dense parameters with a 32000 vocabulary.
    "3b": Shape(_llama(28, 3072, 24, 8192, 2048), attn_rank=768, ffn_rank=2048),
    # A CPU smoke size: checks scripts, says nothing about speed or quality.
    "tiny": Shape(_llama(2, 64, 4, 128, 64), attn_rank=16, ffn_rank=32),
}


def model_flags(shape: str, variant: str, attn_rank: Optional[int] = None) -> list:
    """Architecture and rank flags of ``variant`` (one of ``VARIANTS``) at ``shape``; ``attn_rank``
    replaces the shape's attention rank in the variants that have low-rank attention."""
    size = SHAPES[shape]
    lpa_rank = attn_rank or size.attn_rank
    attn_rank, ffn_rank = {"dense": (0, 0), "lpa": (lpa_rank, 0),
                           "lowrank_ffn": (0, size.ffn_rank),
                           "lowrank_all": (lpa_rank, size.ffn_rank)}[variant]
    return list(size.flags) + ["--lpa-attn-rank", str(attn_rank), "--lpa-ffn-rank", str(ffn_rank)]
