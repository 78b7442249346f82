"""Scoring adapters on held-out rows."""
