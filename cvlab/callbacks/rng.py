"""Saves and restores every random-number generator with the checkpoint, so a resumed run continues exactly.

Lightning restores weights, optimizer, scheduler and loop counters but not the RNGs that drive dropout,
augmentation and worker seeds; this callback carries them.
"""
from __future__ import annotations

import random

import numpy as np
import pytorch_lightning as pl
import torch


class RNGStateCallback(pl.Callback):
    def state_dict(self) -> dict:
        # numpy's key array travels as a tensor so the checkpoint loads with torch.load(weights_only=True)
        kind, keys, position, has_gauss, cached = np.random.get_state()
        state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position,
                                                         has_gauss, cached), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        kind, keys, position, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
