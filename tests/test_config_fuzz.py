"""The config loader, fuzzed: whatever the file holds (random keys, types, values, or not YAML at all), the
result is a valid config (exit 0) or exit 2 with one line naming the problem, never a traceback."""

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raycache.cli import main
from raycache.config import ExperimentConfig, known_keys

KEYS = known_keys(ExperimentConfig)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["cachefl", "fedclip", "tiny", "digits", "dirichlet",
                                                           "1e-4", "-1", "0", "none"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)
dotted = st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=15),
                   st.sampled_from(KEYS).map(lambda k: k + "x"), st.sampled_from(KEYS).map(lambda k: k.upper()))


def nest(pairs: list[tuple[str, object]]) -> dict:
    tree: dict = {}
    for key, value in pairs:
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            child = node.get(p)
            if not isinstance(child, dict):
                child = node[p] = {}
            node = child
        node[leaf] = value
    return tree


def check(capsys, tmp_path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    code = main(["check", str(path)])
    out, err = capsys.readouterr()
    if code == 0:
        assert out.startswith("config ok") and err == ""
    else:
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(st.lists(st.tuples(dotted, values), max_size=6))
def test_random_keys_and_values(capsys, tmp_path, pairs):
    text = yaml.safe_dump(nest(pairs), allow_unicode=True)
    check(capsys, tmp_path, text)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=80))
def test_random_text(capsys, tmp_path, text):
    check(capsys, tmp_path, text)


def test_a_valid_config_passes_and_a_nan_is_named(capsys, tmp_path):
    ok = tmp_path / "ok.yaml"
    ok.write_text("data: {clients: 4, alpha: 0.3}\nfederation: {dropout: 0.2, min_clients: 2}\n")
    assert main(["check", str(ok)]) == 0 and capsys.readouterr().out.startswith("config ok")
    nan = tmp_path / "nan.yaml"
    nan.write_text("data: {alpha: .nan}\n")
    assert main(["check", str(nan)]) == 2 and "data.alpha" in capsys.readouterr().err
