import numpy as np
import pytest

from raycache.data.split import stratified_split
from raycache.errors import UserError


def test_split_is_disjoint_complete_stratified_and_seeded():
    labels = np.repeat(np.arange(4), [50, 60, 70, 80])
    names = list("abcd")
    s = stratified_split(labels, names, 0.2, 5, seed=0)
    allidx = np.concatenate([s.train, s.test, s.server])
    assert np.array_equal(np.sort(allidx), np.arange(len(labels)))
    assert np.array_equal(np.bincount(labels[s.server]), [5, 5, 5, 5])
    assert np.array_equal(np.bincount(labels[s.test]), [10, 12, 14, 16])
    again = stratified_split(labels, names, 0.2, 5, seed=0)
    assert np.array_equal(s.test, again.test) and np.array_equal(s.server, again.server)
    assert not np.array_equal(s.test, stratified_split(labels, names, 0.2, 5, seed=1).test)


def test_too_small_class_names_the_class():
    labels = np.array([0] * 30 + [1] * 3)
    with pytest.raises(UserError, match="class 'b' has 3 images"):
        stratified_split(labels, ["a", "b"], 0.2, 4, seed=0)
