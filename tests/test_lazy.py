"""`lazy_module`: a module bound at import and loaded at first use, so the driver imports methods, the
server and the evaluation maths without torch."""

import pickle
import sys

import pytest

from raycache.lazy import LazyModule, lazy_module


@pytest.fixture
def heavy(tmp_path, monkeypatch):
    name = "raycache_test_heavy_module"
    (tmp_path / f"{name}.py").write_text("value = 41\n\ndef add(x):\n    return x + value\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield name
    sys.modules.pop(name, None)


def test_a_lazy_module_is_imported_at_its_first_use_not_before(heavy):
    m = lazy_module(heavy)
    pickle.loads(pickle.dumps(m))  # pickling it does not load it either
    assert heavy not in sys.modules
    assert m.add(1) == 42
    assert heavy in sys.modules
    assert m.value is sys.modules[heavy].value
    assert "add" in vars(m)  # read from its own dict from now on, as fast as from the module


def test_a_lazy_module_follows_names_the_module_gains_later_and_refuses_writes(heavy):
    m = lazy_module(heavy)
    assert m.value == 41
    sys.modules[heavy].later = "added after the first use"
    assert m.later == "added after the first use"
    with pytest.raises(AttributeError):
        m.missing
    with pytest.raises(AttributeError, match="set value on the module itself"):
        m.value = 1


def test_a_lazy_module_pickles_as_its_name(heavy):
    m = lazy_module(heavy)
    assert m.value == 41
    again = pickle.loads(pickle.dumps(m))
    assert isinstance(again, LazyModule) and again.add(0) == 41
    assert len(pickle.dumps(m)) < 200  # the name, not the module's names copied into it


def test_a_lazy_module_of_a_module_that_is_not_there_fails_at_first_use():
    m = lazy_module("raycache_no_such_module_here")
    with pytest.raises(ModuleNotFoundError):
        m.anything
