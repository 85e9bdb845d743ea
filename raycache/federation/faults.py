"""Injected client faults for studies, as pure functions of (seed, round, client): which sampled clients drop
out, and which miss the round's deadline as stragglers. Drawn per client from its own stream, so the same
clients fail whichever actor hosts them and however many actors there are."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FaultPlan:
    dropped: np.ndarray  # (sampled,) bool: the client does not report (federation.dropout)
    late: np.ndarray  # (sampled,) bool: its simulated delay exceeds the deadline (federation.straggler)
    delays: np.ndarray  # (sampled,) simulated delay in seconds (0 without a straggler distribution)

    @property
    def reporting(self) -> np.ndarray:
        return ~(self.dropped | self.late)


def _uniforms(seed: int, round_idx: int, client: int) -> np.ndarray:
    """Two independent U(0, 1) draws of one client in one round (a stream apart from its training seed)."""
    return np.random.default_rng([seed, 0xFA17, round_idx, client]).random(2)


def delay(u: float, distribution: str, median_s: float, sigma: float) -> float:
    """Inverse CDF: a uniform draw to a delay with the given median."""
    if distribution == "none":
        return 0.0
    if distribution == "exponential":  # median = mean * ln 2
        return float(-np.log1p(-u) * median_s / np.log(2.0))
    if distribution == "lognormal":
        from statistics import NormalDist

        return float(median_s * np.exp(sigma * NormalDist().inv_cdf(min(max(u, 1e-12), 1 - 1e-12))))
    raise ValueError(f"unknown straggler distribution {distribution!r}")


def plan_faults(sampled: np.ndarray, seed: int, round_idx: int, federation) -> FaultPlan:
    """The faults of one round for the sampled clients, from `federation.dropout`, `.straggler` and
    `.round_deadline_s`."""
    n = len(sampled)
    dropped, late, delays = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n)
    st = federation.straggler
    if federation.dropout == 0 and st.distribution == "none":
        return FaultPlan(dropped, late, delays)
    for i, c in enumerate(sampled):
        u_drop, u_delay = _uniforms(seed, round_idx, int(c))
        dropped[i] = u_drop < federation.dropout
        delays[i] = delay(u_delay, st.distribution, st.median_s, st.sigma)
    if federation.round_deadline_s is not None:
        late = ~dropped & (delays > federation.round_deadline_s)
    return FaultPlan(dropped, late, delays)
