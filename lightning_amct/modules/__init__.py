"""Compressed layers and applying a plan to a model."""
