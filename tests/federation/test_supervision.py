"""The server's host deadlines as their documented formulas, on made-up paces (no Ray: the maths alone), and
the wait that applies them, on real Ray calls. The deadlines in action (a host stopped mid-round or
mid-evaluation, and replaced) are in test_faults.py."""

import time
from types import SimpleNamespace

import numpy as np

from raycache.federation.supervision import AUTO_FACTOR, AUTO_FLOOR_S, Supervisor


def supervisor(timeout=None, sizes=(10, 30, 5)) -> Supervisor:
    return Supervisor([], None, SimpleNamespace(client_timeout_s=timeout), np.asarray(sizes, np.int64))


def test_a_configured_timeout_is_per_client_plus_five_seconds():
    s = supervisor(timeout=2.0)
    assert s.deadline(0, [0, 1, 2]) == 2.0 * 3 + 5.0
    s.missed_deadline(0)  # a fixed timeout is the user's: it does not grow
    assert s.deadline(0, [0]) == 7.0


def test_the_automatic_training_deadline_scales_with_the_slowest_pace_and_doubles_per_miss():
    s = supervisor()
    assert s.deadline(0, [0, 1]) is None  # nothing measured yet: no limit
    s.trained(np.array([1.0, 3.0]), np.array([10, 30]))  # 4 s for 40 samples; the slowest client 3 s
    s.trained(np.array([0.1]), np.array([50]))  # a faster host changes neither
    rate, slowest = 4.0 / 40, 3.0
    want = AUTO_FLOOR_S + AUTO_FACTOR * (rate * (10 + 30) + slowest * 2)
    assert s.deadline(1, [0, 1]) == want
    s.missed_deadline(1)
    s.missed_deadline(1)
    assert s.deadline(1, [0, 1]) == 4 * want  # twice missed: four times the time
    assert s.deadline(0, [0, 1]) == want  # another host's misses are its own
    assert s.deadline(0, [2]) == AUTO_FLOOR_S + AUTO_FACTOR * (rate * 5 + slowest)


def test_the_evaluation_deadline_follows_the_slowest_evaluation_pace():
    s = supervisor()
    assert s.eval_deadline(0, 1000) is None  # the first evaluation sets the pace
    s.evaluated(2.0, 100)
    s.evaluated(1.0, 100)  # a faster answer does not shorten it
    assert s.eval_deadline(0, 50) == AUTO_FLOOR_S + AUTO_FACTOR * 0.02 * 50
    s.missed_deadline(0)
    assert s.eval_deadline(0, 50) == 2 * (AUTO_FLOOR_S + AUTO_FACTOR * 0.02 * 50)
    assert not s.replaceable  # no host spec: a failed host cannot be restarted


def test_the_wait_yields_each_answer_once_and_a_silent_call_at_its_limit(ray_session):
    """Two calls that answered at once, both already past their limit (0 s), are answers, not late; a call that
    stays silent is yielded as late once its limit has passed, and not before."""
    ray = ray_session

    @ray.remote(num_cpus=0)
    def silent() -> None:
        time.sleep(60)

    hung = silent.remote()
    refs = {0: ray.put("a"), 1: ray.put("b"), 2: hung}
    try:
        began = time.monotonic()
        seen = list(supervisor().wait(refs, lambda h: 0.0 if h < 2 else 0.5))
        took = time.monotonic() - began
    finally:
        ray.cancel(hung, force=True)
    assert sorted(seen[:2]) == [(0, None), (1, None)]
    assert seen[2:] == [(2, 0.5)] and 0.5 <= took < 5
