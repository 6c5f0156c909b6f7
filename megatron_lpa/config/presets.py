"""Named model shapes and the four variants as ``pretrain_gpt.py`` flags, read from the example
configs.

A shape is a family of files in ``examples/configs``: ``130m`` is ``llama_130m_<variant>.yaml``,
``3b`` is ``llama_3b_<variant>.yaml`` and ``tiny`` is ``tiny_cpu.yaml`` (its LPA model; the dense
variant is the same with rank 0). Their model sections are the only statement of each shape and
rank, so the scripts that compare variants at a fixed shape (``benchmarks/bench_train.py``,
``benchmarks/parallel_numerics.py``, ``experiments/wiki_experiment.py``) cannot drift from the
configs. The runs themselves, with schedules and batches, are the YAML files.
"""

from functools import lru_cache
from pathlib import Path
from typing import Optional

import yaml

from megatron_lpa.config.command_line import settings_as_flags
from megatron_lpa.config.training_config import ModelSection, setting_names

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
FAMILIES = {"130m": "llama_130m", "3b": "llama_3b", "tiny": "tiny_cpu"}
SHAPES = tuple(FAMILIES)
VARIANTS = ("dense", "lpa", "lowrank_ffn", "lowrank_all")
# The architecture settings of a config (not its dropout, init, ranks, schedule or data).
MODEL_KEYS = tuple(
    name
    for name in setting_names(ModelSection, with_derived=False)
    if name not in ModelSection.INIT_ONLY + ("lpa_attn_rank", "lpa_ffn_rank")
)


@lru_cache(maxsize=None)
def _settings(shape: str, variant: str) -> dict:
    family = FAMILIES[shape]
    path = CONFIGS / (f"{family}.yaml" if shape == "tiny" else f"{family}_{variant}.yaml")
    if not path.is_file():
        raise SystemExit(
            f"shape {shape!r} has no {variant} config ({path}); variants with one: "
            f"{', '.join(variants(shape))}."
        )
    return yaml.safe_load(path.read_text())


def variants(shape: str) -> list:
    """The variants ``shape`` has a config for."""
    if shape == "tiny":
        return ["dense", "lpa"]
    return [v for v in VARIANTS if (CONFIGS / f"{FAMILIES[shape]}_{v}.yaml").is_file()]


def ranks(shape: str, variant: str) -> tuple:
    """(attention rank, FFN rank) of ``variant`` at ``shape``, as its config sets them."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "dense":
        return 0, 0
    settings = _settings(shape, "lpa" if shape == "tiny" else variant)
    return settings.get("lpa_attn_rank", 0), settings.get("lpa_ffn_rank", 0)


def model_flags(shape: str, variant: str, attn_rank: Optional[int] = None) -> list:
    """Architecture and rank flags of ``variant`` (one of ``VARIANTS``) at ``shape``; ``attn_rank``
    replaces the config's attention rank in the variants that have low-rank attention."""
    settings = _settings(shape, "lpa" if shape == "tiny" else "dense")
    model = {key: settings[key] for key in MODEL_KEYS if key in settings}
    attn, ffn = ranks(shape, variant)
    model.update(lpa_attn_rank=(attn_rank or attn) if attn else 0, lpa_ffn_rank=ffn)
    return settings_as_flags(model, f"{FAMILIES[shape]} config")
