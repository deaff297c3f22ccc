"""How the tests build lies: one element of an honest tensor changed, wrapping in its dtype
(a bool is flipped). Shared by the game, contract, provider and watchtower tests."""

from __future__ import annotations

import numpy as np


def changed(tensor: np.ndarray, element: int = 0, delta: int = 1) -> np.ndarray:
    """A copy of `tensor` with flat element `element` moved by `delta` modulo its dtype's
    range (flipped for bool): always a different value, never a new dtype."""
    lie = tensor.copy()
    flat = lie.reshape(-1)
    if lie.dtype == bool:
        flat[element] = not flat[element]
    else:
        info = np.iinfo(lie.dtype)
        span = int(info.max) - int(info.min) + 1
        flat[element] = (int(flat[element]) - int(info.min) + delta) % span + int(info.min)
    return lie
