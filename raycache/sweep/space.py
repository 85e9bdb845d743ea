"""A sweep file: a base experiment, overrides, and a search space over dotted config keys.

    name: cachefl-quick             # the parent MLflow run and the Tune experiment folder
    base: ../quickstart.yaml        # an experiment config, relative to this file
    set: [federation.rounds=2]      # overrides on the base
    metric: val_accuracy            # reported every round; the best trial maximises (mode: max) it
    scheduler: fifo                 # or asha: stop weak trials by round
    max_concurrent: 2
    space:
      data.alpha: {grid: [0.1, 0.5, 1.0]}
      method.lr: {loguniform: [1.0e-4, 1.0e-2]}

Every value a search type can produce is checked against the experiment config's types before anything
runs: an unknown key, an empty grid, or a type that cannot fit the key exits 2 with one line.
"""

from __future__ import annotations

import copy
import difflib
import itertools
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from raycache.config import ExperimentConfig, known_keys

from raycache.config_file import absolute_path, absolute_paths, apply_override, build_config, parse_override, read_yaml_file
from raycache.errors import UserError

SEARCH_TYPES = ("grid", "choice", "uniform", "loguniform", "randint")

# Metrics measured on test data (the global test split, or the clients' own held-out test samples): they
# report, they never select. `result_<m>` is <m> at the run's selected round.
TEST_METRICS = frozenset({"accuracy", "selected_accuracy", "final_accuracy", "zeroshot_accuracy",
                          "client_accuracy_mean", "client_accuracy_std", "local_accuracy_mean",
                          "local_accuracy_std"})


def is_test_metric(name: str) -> bool:
    return name.removeprefix("result_") in TEST_METRICS


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="sweep name (folder-safe)")
    base: str = Field(description="base experiment YAML, relative to the sweep file")
    set: list[str] = Field([], description="key=value overrides on the base experiment")
    metric: str = Field("val_accuracy", description="per-round metric the scheduler and the best trial use")
    allow_test_selection: bool = Field(False, description="let `metric` be a test metric (test-set leakage: "
                                                          "only for knowingly optimistic numbers)")
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["fifo", "asha"] = "fifo"
    grace_rounds: int = Field(1, ge=1, description="asha: rounds every trial runs before it can be stopped")
    reduction_factor: int = Field(3, ge=2, description="asha: at each rung, the 1/factor best trials go on")
    num_samples: int = Field(1, ge=1, description="repeats of the grid; random types draw anew each time")
    max_concurrent: int = Field(2, ge=1, description="trials running at once (each reserves its actors)")
    max_failures: int = Field(1, ge=0, description="retries of a failed trial (a lost process or node): it "
                                                   "continues its own run from its last round's checkpoint")
    warm_trials: bool = Field(True, description="a finished trial's processes (Tune's trial actor, its server "
                                                "and client actors) serve the next trial of the same resources, "
                                                "re-initialised; false starts fresh ones for every trial")
    space: dict[str, dict[str, list[Any]]] = Field(min_length=1, description="dotted key -> {type: values}")

    @field_validator("space")
    @classmethod
    def _one_type_each(cls, v: dict) -> dict:
        for key, spec in v.items():
            if len(spec) != 1 or next(iter(spec)) not in SEARCH_TYPES:
                raise ValueError(f"space.{key}: give exactly one search type of {', '.join(SEARCH_TYPES)}")
        return v


def _check_key(key: str) -> None:
    known = known_keys(ExperimentConfig)
    if key not in known:
        close = difflib.get_close_matches(key, known, n=1)
        raise UserError(f"space.{key}: unknown config key{f' (did you mean {close[0]}?)' if close else ''}")


def _fits(base: dict, key: str, value: Any) -> None:
    tree = copy.deepcopy(base)
    apply_override(tree, key, value)
    try:
        build_config(tree)
    except UserError as err:
        raise UserError(f"space.{key}: {value!r} does not fit ({str(err).removeprefix('config error: ')})") from None


def check_space(space: dict[str, dict[str, list]], base: dict) -> None:
    """Every key exists and every value its search type can produce validates as that key."""
    for key, spec in space.items():
        _check_key(key)
        kind, values = next(iter(spec.items()))
        if kind in ("grid", "choice"):
            if not values:
                raise UserError(f"space.{key}: empty {kind}")
            for v in values:
                _fits(base, key, v)
            continue
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise UserError(f"space.{key}: {kind} takes [low, high] numbers, got {values!r}")
        low, high = values
        if not low < high:
            raise UserError(f"space.{key}: {kind} needs low < high, got [{low}, {high}]")
        if kind == "loguniform" and low <= 0:
            raise UserError(f"space.{key}: loguniform needs low > 0, got {low}")
        samples = [int(low), int(high) - 1] if kind == "randint" else [float(low), float(high)]
        for v in samples:
            try:
                _fits(base, key, v)
            except UserError:
                what = "integers" if kind == "randint" else "floats"
                raise UserError(f"space.{key}: {kind} draws {what}, which {key} does not take "
                                f"(use {'grid or choice' if kind == 'randint' else 'randint, grid or choice'})"
                                ) from None


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
               name: str | None = None) -> tuple[SweepConfig, dict]:
    """(sweep config, base experiment tree with the sweep's and the command line's overrides applied);
    `name` replaces the file's name (`raycache sweep --name`)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"sweep file not found: {p}")
    raw = read_yaml_file(p, expected="a mapping with name, base and space")
    if name is not None:  # checked below like the file's own name
        raw = {**raw, "name": name}
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        raise UserError(f"sweep error: {msg}" if msg.startswith("space.") else f"sweep error: {loc}: {msg}") from None
    if is_test_metric(sweep.metric) and not sweep.allow_test_selection:
        raise UserError(f"sweep error: metric: {sweep.metric!r} is measured on test data; selecting trials or "
                        f"stopping them on it leaks the test set into the result. Use val_accuracy (or set "
                        f"allow_test_selection: true to do it knowingly)")
    base_path = (p.parent / sweep.base).resolve()
    if not base_path.is_file():
        raise UserError(f"base: experiment file {base_path} not found")
    tree = read_yaml_file(base_path)
    for item in [*sweep.set, *overrides]:
        apply_override(tree, *parse_override(item))
    # Trials run in their own working directories: a relative path means what it means here, for the checks
    # below and for every trial.
    tree = absolute_paths(tree)
    sweep = sweep.model_copy(update={"space": {  # and so does one in the space's values
        key: {kind: [absolute_path(key, v) for v in values] if kind in ("grid", "choice") else values
              for kind, values in spec.items()} for key, spec in sweep.space.items()}})
    build_config(tree)  # the base itself must be valid
    check_space(sweep.space, tree)
    _check_validation_metric(sweep, tree)
    return sweep, tree


def _check_validation_metric(sweep: SweepConfig, base: dict) -> None:
    """A validation metric needs a validation split in every trial, or no trial could report it."""
    if "val_" not in sweep.metric:
        return
    values = [build_config(base).data.val_fraction]
    spec = sweep.space.get("data.val_fraction", {})
    for kind, vals in spec.items():
        values += list(vals) if kind in ("grid", "choice") else [vals[0]]
    if any(not (isinstance(v, (int, float)) and v > 0) for v in values):
        raise UserError(f"sweep error: metric: {sweep.metric!r} needs a validation split, but data.val_fraction "
                        f"can be 0 in this sweep; keep data.val_fraction > 0")


def grid_points(space: dict[str, dict[str, list]]) -> list[dict[str, Any]]:
    """The grid keys' cartesian product (one empty point if there is no grid)."""
    grid = {k: v["grid"] for k, v in space.items() if "grid" in v}
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def tune_space(space: dict[str, dict[str, list]]) -> dict[str, Any]:
    """The space as Ray Tune search objects, keyed by the dotted config key."""
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    return {key: make[kind](values) for key, spec in space.items() for kind, values in spec.items()}


def most_swept(space: dict[str, dict[str, list]], trials: list[dict[str, Any]]) -> list[str]:
    """Keys ordered by how many distinct values the trials took (for the heatmap's axes)."""
    return sorted(space, key=lambda k: -len({repr(t.get(k)) for t in trials}))
