"""Synthetic fashion catalogue generator."""
