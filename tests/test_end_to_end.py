"""A real federated CacheFL run on Ray (actors, Ray Data, open_clip) logged to a real MLflow sqlite store."""

import numpy as np
import pytest

from raycache.config import settings_for
from raycache.config_file import load_config
from raycache.experiment import run_experiment
from conftest import DATA_HELPER_PROCESSES

N_CLASSES, SHOTS, DIM = 10, 16, 64


@pytest.fixture(scope="module")
def store(e2e_store):
    return e2e_store


@pytest.fixture(scope="module")
def finished(e2e_run):
    return e2e_run


def test_cachefl_beats_zero_shot(finished):
    cfg, summary, rounds, _, _ = finished
    assert rounds == [1, 2]
    assert summary.encoded == summary.distinct_images == 1797
    assert summary.final["accuracy"] > summary.zeroshot_accuracy + 0.1  # ~0.10 (chance) vs ~0.4


def test_the_rounds_run_without_ray_datas_helpers(finished):
    """Encoding's Ray Data pipeline leaves detached helper actors (about 310 MB); a run that started its local
    Ray stops them once encoding is done, so that they do not sit beside the whole federation."""
    *_, actors = finished
    assert any("ClientHost" in a for a in actors), actors  # the federation's own actors were seen
    left = [a for a in actors if any(k in a for k in DATA_HELPER_PROCESSES)]
    assert not left, actors


def test_mlflow_holds_the_run(finished):
    cfg, summary, _, client, _ = finished
    run = client.get_run(summary.run_id)
    # round 0 (the initial state, before training), as the summary table prints it, is the logged step 0
    (step0,) = [m for m in client.get_metric_history(summary.run_id, "accuracy") if m.step == 0]
    assert summary.initial["accuracy"] == step0.value and summary.initial["val_accuracy"] <= 1
    assert run.info.status == "FINISHED"
    assert run.data.params["data.alpha"] == "0.5" and run.data.params["method.shots"] == str(SHOTS)
    assert run.data.params["model.pretrained"] == "None"
    for key in ["accuracy", "client_accuracy_mean", "client_accuracy_std", "loss", "comm_bytes_up",
                "comm_bytes_down", "round_seconds", "client_seconds", "peak_memory_mb", "trainable_params"]:
        steps = [m.step for m in client.get_metric_history(summary.run_id, key)]
        assert set(steps) >= {1, 2}, key
    assert run.data.metrics["zeroshot_accuracy"] == pytest.approx(summary.zeroshot_accuracy)
    # Exact payload: every one of the 6 clients receives and sends N*K*D float32 keys each round.
    payload = N_CLASSES * SHOTS * DIM * 4
    for m in client.get_metric_history(summary.run_id, "comm_bytes_up"):
        assert m.value == 6 * payload
    assert run.data.metrics["comm_bytes_down"] == 6 * payload
    assert run.data.metrics["trainable_params"] == N_CLASSES * SHOTS * DIM
    artifacts = {a.path for a in client.list_artifacts(summary.run_id)}
    assert {"config.yaml", "partition.csv"} <= artifacts
    csv = client.download_artifacts(summary.run_id, "partition.csv")
    rows = np.loadtxt(csv, delimiter=",", skiprows=1)
    assert rows.shape == (6, N_CLASSES + 2) and rows[:, -1].sum() == run.data.metrics["samples_train"]
    sizes = rows[:, -1]  # the clients' sizes, as logged
    assert (run.data.metrics["client_size_min"], run.data.metrics["client_size_median"],
            run.data.metrics["client_size_max"]) == (sizes.min(), np.median(sizes), sizes.max())


def test_second_run_reuses_features(finished):
    cfg, first, _, _, _ = finished
    again = run_experiment(cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": 1})}))
    assert again.encoded == 0
    assert again.history[0]["accuracy"] == pytest.approx(first.history[0]["accuracy"])  # same seed, same round 1


def test_cachefl_with_a_synthetic_cache(finished, store, mlflow_uri):
    cfg, _, _, client, _ = finished
    syn = cfg.model_copy(update={
        "method": cfg.method.model_copy(update={"cache_init": "synthetic", "shots": 2}),
        "synth": cfg.synth.model_copy(update={"generator": "tiny", "per_class": 2, "steps": 2}),
        "federation": cfg.federation.model_copy(update={"rounds": 1})})
    summary = run_experiment(syn)
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    # Tip-Adapter's keys: 10 augmented views of each of the 20 key images (only those) through the encoder
    assert run.data.metrics["synth_images"] == 20 and run.data.metrics["cache_views_encoded"] == 20 * 10
    assert run.data.params["synth.generator"] == "tiny" and run.data.params["method.cache_init"] == "synthetic"
    assert 0 <= run.data.metrics["accuracy"] <= 1 and run.data.metrics["comm_bytes_up"] == 6 * 10 * 2 * DIM * 4
    assert (store / "synth").is_dir()  # the set lives in the feature store, keyed by its settings
    (synth_dir,) = list((store / "synth").iterdir())
    cache_input, = [i.dataset for i in run.inputs.dataset_inputs if i.tags[0].value == "cache"]
    assert cache_input.name == "synthetic/tiny" and cache_input.source == f'{{"uri": "{synth_dir}"}}'
    assert cache_input.profile == '{"num_rows": 20}'
    # The keys' source is the synthetic set itself, in class order, with its labels.
    from raycache.data.cache_source import cache_examples
    from raycache.data.features import load_or_encode
    from raycache.data.sources import open_source
    from raycache.models.clip import ModelSpec

    source = open_source(syn.data)
    f, y, metrics = cache_examples(syn, ModelSpec.from_config(syn.model), source, None, np.zeros((1, DIM)))
    assert metrics["synth_images_generated"] == 0  # complete: reused, not regenerated
    assert metrics["cache_views_encoded"] == 0  # the augmented keys are stored: not encoded again
    synthetic = open_source(syn.data.model_copy(update={"dataset": str(synth_dir)}))
    encoded = load_or_encode(synthetic, ModelSpec.from_config(syn.model), syn.runtime)
    assert not np.allclose(f, encoded.features)  # the views' mean, not the centre crop
    plain = syn.model_copy(update={"method": syn.method.model_copy(update={"augment_views": 1})})
    f1, _, _ = cache_examples(plain, ModelSpec.from_config(syn.model), source, None, np.zeros((1, DIM)))
    np.testing.assert_array_equal(f1, encoded.features)  # one view: the stored centre-crop features
    assert list(y) == [c for c in range(N_CLASSES) for _ in range(2)]
    # alpha and beta were searched on validation after training, and the result carries them
    m = run.data.metrics
    trained = (float(run.data.params["method.alpha"]), float(run.data.params["method.beta"]))
    on_grid = 0.1 <= m["searched_beta"] < 7 and 0.1 <= m["searched_alpha"] < 3  # the default grid
    assert on_grid or (m["searched_alpha"], m["searched_beta"]) == trained  # or the trained pair, kept
    assert m["result_val_accuracy"] >= 0 and "presearch_accuracy" in m
    from safetensors.numpy import load_file

    final = load_file(run.data.tags["raycache.result_checkpoint"])
    assert final["global/alpha"].tolist() == pytest.approx([m["searched_alpha"]])


def test_random_cache_is_balanced_unit_keys():
    from types import SimpleNamespace

    from raycache.data.cache_source import cache_examples

    cfg = load_config("experiments/tiny.yaml", ["method.cache_init=random", "method.shots=3"])
    source = SimpleNamespace(class_names=list("abcd"))
    f, y, _ = cache_examples(cfg, None, source, None, np.zeros((5, 8), np.float32))
    assert f.shape == (12, 8) and np.allclose(np.linalg.norm(f, axis=1), 1, atol=1e-6)
    assert list(np.bincount(y)) == [3, 3, 3, 3]


def test_zeroshot_needs_no_cache_source(finished):
    cfg, first, _, client, _ = finished
    zs = cfg.model_copy(update={
        "method": cfg.method.model_copy(update={"name": "zeroshot", "cache_init": "synthetic"}),
        "synth": cfg.synth.model_copy(update={"generator": "acme/not-on-this-machine"}),
        "federation": cfg.federation.model_copy(update={"rounds": 1})})
    summary = run_experiment(zs)  # nothing is generated, so the missing generator does not matter
    assert summary.final["accuracy"] == pytest.approx(summary.zeroshot_accuracy)
    assert summary.comm_bytes == 0
    # The split depends on the data config and the seed, not the method: the same clients as CacheFL's run.
    train = client.get_run(summary.run_id).data.metrics["samples_train"]
    assert train == client.get_run(first.run_id).data.metrics["samples_train"]
    parts = [client.download_artifacts(r, "partition.csv") for r in (summary.run_id, first.run_id)]
    assert open(parts[0]).read() == open(parts[1]).read()


def test_fedclip_runs_on_ray_with_its_reference_settings(finished):
    cfg, _, _, client, _ = finished
    fc = cfg.model_copy(update={
        "method": settings_for("fedclip"),
        "federation": cfg.federation.model_copy(update={"rounds": 1})})
    summary = run_experiment(fc)
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["method.lr"] == "5e-05" and run.data.params["method.loss"] == "contrastive"
    assert run.data.metrics["comm_bytes_up"] == 6 * 2 * (DIM * DIM + DIM) * 4
    assert run.data.metrics["trainable_params"] == 2 * (DIM * DIM + DIM)
    assert np.isfinite(run.data.metrics["loss"])


def test_compare_tabulates_and_plots_the_experiment(finished, capsys):
    """Runs last in this module: the e2e experiment then holds cachefl, zeroshot and fedclip runs."""
    from raycache.cli import main
    from raycache.compare import compare

    cfg, summary, _, client, _ = finished
    assert main(["compare", "e2e"]) == 0
    out = capsys.readouterr().out
    assert "cachefl" in out and "fedclip" in out and "zeroshot" in out
    rows, run = compare("e2e")
    by = {r.method: r for r in rows}
    exp = client.get_experiment_by_name("e2e").experiment_id
    finished_runs = [r for r in client.search_runs([exp], "attributes.status = 'FINISHED'")
                     if "raycache.method" in r.data.tags]
    ignore = ("seed", "method.lr_scale", "tracking.", "runtime.")
    for method in {r.data.tags["raycache.method"] for r in finished_runs}:
        mine = [r for r in finished_runs if r.data.tags["raycache.method"] == method]
        groups: dict = {}
        for r in mine:  # a setting: every param but the seed, tracking and runtime keys
            key = frozenset((k, v) for k, v in r.data.params.items() if not k.startswith(ignore))
            groups.setdefault(key, []).append(r)
        # validation picks the setting; only its runs are averaged; their test accuracy at the selected round
        chosen = max(groups.values(), key=lambda g: np.mean([r.data.metrics["result_val_accuracy"] for r in g]))
        assert by[method].settings == len(groups) and by[method].runs == len(chosen)
        assert by[method].accuracy == pytest.approx(np.mean([r.data.metrics["result_accuracy"] for r in chosen]))
        assert by[method].val_accuracy == pytest.approx(
            np.mean([r.data.metrics["result_val_accuracy"] for r in chosen]))
        assert all(r.data.metrics["result_accuracy"] == r.data.metrics["selected_accuracy"] for r in chosen)
    assert by["cachefl"].settings >= 2  # the e2e module ran cachefl at more than one setting
    assert by["zeroshot"].bytes_total == 0 and by["fedclip"].trainable_params == 2 * (DIM * DIM + DIM)
    first = client.get_run(summary.run_id).data.metrics
    assert by["cachefl"].bytes_total > 0 and first["comm_bytes_up_total"] > 0
    artifacts = {a.path for a in client.list_artifacts(run.run_id)}
    assert {"comparison.csv", "accuracy_vs_round.png", "accuracy_vs_bytes.png"} <= artifacts
    from PIL import Image

    assert Image.open(client.download_artifacts(run.run_id, "accuracy_vs_bytes.png")).size[0] >= 500
    assert main(["compare", "no-such-experiment"]) == 2


def test_the_run_records_the_datasets_it_read(finished):
    """Lineage: the training, validation and test splits as MLflow dataset inputs, each with its source, a
    digest of its exact rows and its size; another seed's split of the same data has other digests."""
    import json

    from raycache.experiment import prepare

    cfg, summary, _, client, _ = finished
    inputs = client.get_run(summary.run_id).inputs.dataset_inputs
    got = {i.tags[0].value: i.dataset for i in inputs}
    assert set(got) == {"training", "validation", "test"}
    splits = prepare(cfg).splits
    for context, rows in (("training", splits.train), ("validation", splits.val), ("test", splits.test)):
        assert json.loads(got[context].profile)["num_rows"] == len(rows)
        assert json.loads(got[context].source) == {"uri": "digits"} and got[context].name == f"digits/{context}"
    assert len({d.digest for d in got.values()}) == 3
    other = prepare(cfg.model_copy(update={"seed": 1})).splits
    from raycache.lineage import split_records

    again = {r.context: r.digest for r in split_records(prepare(cfg).source, "digits", splits)}
    moved = {r.context: r.digest for r in split_records(prepare(cfg).source, "digits", other)}
    assert again == {c: d.digest for c, d in got.items()}  # the same rows: the same digest
    assert all(moved[c] != again[c] for c in again)
