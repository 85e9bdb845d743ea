"""Selection over rounds: validation chooses the round (earliest on ties), test is only reported; the target
figures are the first round whose validation accuracy reaches the target and the bytes spent by then."""

import numpy as np

from raycache.federation.evaluate import owner_accuracy
from raycache.federation.selection import Selection

VAL = [0.30, 0.55, 0.70, 0.70, 0.65]  # round 0 is the initial state; rounds 2 and 3 tie for best
TEST = [0.31, 0.50, 0.66, 0.72, 0.80]  # the test optimum (round 4) is *not* the validation optimum
BYTES = [0.0, 100.0, 100.0, 50.0, 50.0]


def offered(target=None) -> Selection:
    sel = Selection(target)
    for r, (v, t, b) in enumerate(zip(VAL, TEST, BYTES)):
        sel.offer(r, {"val_accuracy": v, "accuracy": t, "local_accuracy_mean": t - 0.1}, b)
    return sel


def test_the_best_validation_round_is_selected_and_its_test_accuracy_reported():
    s = offered().summary("best_val")
    assert s["best_round"] == 2  # the earliest of the tied best
    assert s["best_val_accuracy"] == 0.70 and s["selected_accuracy"] == 0.66  # not the test optimum 0.80
    assert s["result_round"] == 2 and s["result_accuracy"] == 0.66 and s["result_val_accuracy"] == 0.70
    assert abs(s["result_local_accuracy_mean"] - 0.56) < 1e-12


def test_final_selection_reports_the_last_round():
    s = offered().summary("final")
    assert s["best_round"] == 2 and s["selected_accuracy"] == 0.66  # still logged, for comparison
    assert s["result_round"] == 4 and s["result_accuracy"] == 0.80


def test_target_figures_are_the_first_reach_and_the_bytes_so_far():
    s = offered(target=0.55).summary("best_val")
    assert s["rounds_to_target"] == 1 and s["bytes_to_target"] == 100.0
    s = offered(target=0.70).summary("best_val")
    assert s["rounds_to_target"] == 2 and s["bytes_to_target"] == 200.0
    assert "rounds_to_target" not in offered(target=0.9).summary("best_val")  # never reached: absent


def test_the_record_survives_a_checkpoint_round_trip():
    import json

    sel = Selection(0.6)
    for r in range(3):
        sel.offer(r, {"val_accuracy": VAL[r], "accuracy": TEST[r]}, BYTES[r])
    back = Selection.from_json(json.loads(json.dumps(sel.to_json())))
    for r in range(3, 5):
        for s in (sel, back):
            s.offer(r, {"val_accuracy": VAL[r], "accuracy": TEST[r]}, BYTES[r])
    assert back.summary("best_val") == sel.summary("best_val")
    assert sel.summary("best_val")["best_round"] == 2 and sel.summary("best_val")["rounds_to_target"] == 2


def test_owner_accuracy_is_each_clients_hit_rate_on_its_own_rows():
    owner = np.array([0, 0, 0, 1, 2, 2])
    labels = np.array([1, 2, 3, 0, 5, 5])
    pred = np.array([1, 0, 3, 0, 4, 5])
    np.testing.assert_allclose(owner_accuracy(pred, labels, owner, 4), [2 / 3, 1.0, 0.5, 0.0])


def test_a_checkpoint_at_its_best_round_reads_back_one_copy_of_the_state(tmp_path):
    """A checkpoint taken at the best validation round holds the state twice (`global/` and `best/`); read
    back, the best state is the global state itself (a rebuilt or resumed server holds one full model, as the
    server that wrote it did). At another round the two stay apart, each with its own values."""
    from raycache.federation import checkpoint

    rng = np.random.default_rng(0)
    state = {"w": rng.normal(size=(4, 3)).astype(np.float32)}
    older = {"w": rng.normal(size=(4, 3)).astype(np.float32)}
    reached = np.array([True, False])
    for best_round, best_state in ((3, state), (2, older)):
        sel = Selection()
        sel.best_round = best_round
        snap = {"state": state, "clients": {}, "reached": reached, "selection": sel.to_json(),
                "best": {"state": best_state, "clients": {}, "reached": reached}}
        back = checkpoint.load(checkpoint.save(tmp_path / f"r{best_round}.safetensors", 3, snap, {}),
                               "test").snapshot
        np.testing.assert_array_equal(back["state"]["w"], state["w"])
        np.testing.assert_array_equal(back["best"]["state"]["w"], best_state["w"])
        assert (back["best"]["state"] is back["state"]) == (best_round == 3)
