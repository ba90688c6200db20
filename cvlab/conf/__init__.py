"""Hydra configs shipped with cvlab (also reachable as ./conf in a checkout)."""
