"""Data pipeline: JSON lines -> indexed datasets (preprocessing) and the GPT datasets that
training reads from them.

``DataConfig`` and ``build_train_valid_test_datasets`` import megatron-core (and torch), so
they load on first use; preprocessing never pays for that import.
"""

_LAZY = {"DataConfig", "build_train_valid_test_datasets"}


def __getattr__(name: str):
    if name in _LAZY:
        from megatron_lpa.data import gpt_datasets

        return getattr(gpt_datasets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
