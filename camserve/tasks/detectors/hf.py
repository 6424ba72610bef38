"""Hugging Face detectors (placeholder filled below)."""
HF_FAMILIES: tuple = ()
