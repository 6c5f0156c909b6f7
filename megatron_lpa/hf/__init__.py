"""Hugging Face transformers models and checkpoint conversion (needs the ``transformers`` extra)."""
