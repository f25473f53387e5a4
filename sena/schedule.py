"""The learning-rate schedule of every loop here: SENA's rounds and both stages of the world's θ0 build."""

import math


def lr_at(step, total, lr, warmup, floor=0.0, constant=False):
    """Learning rate of step `step` (0-based) of `total`: linear warmup over `warmup` steps to lr, then constant or
    cosine decay to floor·lr at the last step.

        step < warmup:   lr · (step + 1) / warmup
        after:           lr · (floor + (1 − floor) · ½(1 + cos(π·p)))       p = (step − warmup) / (total − warmup)
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    if constant:
        return lr
    p = (step - warmup) / max(1, total - warmup)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))
