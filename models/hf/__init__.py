"""Hugging Face checkpoint import/export (placeholder, filled by the HF work)."""
