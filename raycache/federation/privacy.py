"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018), as pure functions, and the privacy
spent from Opacus' RDP accountant.

Each client's update u = w_client - w_global is clipped to L2 norm S over the whole update (every key
together): u * min(1, S / ||u||). The server averages the m clipped updates uniformly and adds
N(0, (z S / m)^2) to each coordinate; z is the noise multiplier. A client's influence on the average is
then at most S / m, so the mechanism is the Gaussian mechanism with multiplier z on each round, and with
clients sampled at rate q the privacy spent after T rounds follows from (q, z, T) by the accountant.
"""

from __future__ import annotations

import numpy as np

State = dict[str, np.ndarray]


def update_norm(update: State, reference: State) -> float:
    """The L2 norm of update - reference over every key together."""
    return float(np.sqrt(sum(float(((np.asarray(update[k], np.float64) - np.asarray(reference[k], np.float64)) ** 2
                                    ).sum()) for k in update)))


def clip_update(update: State, reference: State, clip_norm: float) -> State:
    """The client's state with its update (state - reference) scaled to L2 norm at most `clip_norm`."""
    scale = min(1.0, clip_norm / max(update_norm(update, reference), 1e-12))
    return {k: (np.asarray(reference[k], np.float64) + scale * (np.asarray(update[k], np.float64)
                                                                 - np.asarray(reference[k], np.float64))
                ).astype(np.float32) for k in update}


def add_noise(mean: State, std: float, rng: np.random.Generator) -> State:
    """`mean` plus independent N(0, std^2) on every coordinate."""
    return {k: (np.asarray(v, np.float64) + rng.normal(0.0, std, size=np.shape(v))).astype(np.float32)
            for k, v in mean.items()}


def noise_std(noise_multiplier: float, clip_norm: float, clients: int) -> float:
    """z * S / m: the noise on the uniform average of m clipped updates."""
    return noise_multiplier * clip_norm / clients


def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """The (epsilon, delta) privacy spent by `rounds` rounds of the Gaussian mechanism with multiplier z at
    client sampling rate q, from Opacus' RDP accountant."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(noise_multiplier, sample_rate, rounds)]
    return float(acc.get_epsilon(delta))
