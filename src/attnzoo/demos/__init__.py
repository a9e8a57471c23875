"""Embedded datasets and small training tasks (nothing is downloaded)."""
