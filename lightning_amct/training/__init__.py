"""Helpers the callback uses while training: parameter groups and what gets logged."""
