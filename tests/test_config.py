import pytest

from raycache.config import check_cache_size

from raycache.config_file import load_config
from raycache.errors import UserError
from raycache.methods import method_names


def test_defaults_are_valid():
    cfg = load_config(None)
    assert cfg.method.name == "cachefl" and cfg.data.dataset == "digits"


def test_yaml_and_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("seed: 3\ndata: {clients: 7}\n")
    cfg = load_config(p, ["data.alpha=0.1", "method.lr=1e-4", "model.pretrained=null", "federation.rounds=2"])
    assert (cfg.seed, cfg.data.clients, cfg.data.alpha) == (3, 7, 0.1)
    assert cfg.method.lr == pytest.approx(1e-4)  # YAML reads '1e-4' as a string; the typed field coerces it
    assert cfg.model.pretrained is None and cfg.federation.rounds == 2


def test_flat_has_every_dotted_key():
    flat = load_config(None).flat()
    for key in ["seed", "model.name", "model.pretrained", "data.dataset", "data.clients", "data.partition",
                "data.alpha", "method.name", "method.shots", "method.alpha", "method.beta", "method.lr",
                "method.local_epochs", "federation.rounds", "federation.fraction", "tracking.experiment"]:
        assert key in flat


@pytest.mark.parametrize("override, names", [
    ("data.alpah=0.1", "data.alpah: unknown config key (did you mean data.alpha?)"),
    ("nonsense=1", "nonsense: unknown config key"),
    ("data.clients=abc", "data.clients"),
    ("data.clients=true", "data.clients: Input should be a valid integer (got True)"),
    ("seed='5'", "seed: Input should be a valid integer (got '5')"),
    ("model.templates=photo", "model.templates: Input should be a valid list"),
    ("model.templates=[photo]", "model.templates: template 'photo' has no '{}' slot"),
    ("synth.prompts=[photo]", "synth.prompts: prompt 'photo' has no '{}' slot"),
    ("data.clients=0", "data.clients"),
    ("data.alpha=0", "data.alpha"),
    ("data.alpha=-1", "data.alpha"),
    ("method.shots=0", "method.shots"),
    ("federation.fraction=0", "federation.fraction"),
    ("federation.fraction=1.5", "federation.fraction"),
    ("data.partition=random", "data.partition"),
    ("method.name=fedprox9", "method.name: unknown method 'fedprox9'; choose one of: " + ", ".join(method_names())),
    ("method.lora_rank=4", "method.lora_rank: cachefl has no setting 'lora_rank'; its settings: alpha, "
                           "augment_views, batch_size, beta, betas, cache_init, eps, local_epochs, lr, lr_scale, "),
    ("seed.x=1", "seed: Input should be a valid integer"),
])
def test_bad_values_name_the_key(override, names):
    with pytest.raises(UserError) as info:
        load_config(None, [override])
    msg = str(info.value)
    assert names in msg and "\n" not in msg


@pytest.mark.parametrize("overrides, names", [
    (["method.name=flora", "method.lora_rank=0"], "method.lora_rank: Input should be greater than or equal to 1"),
    (["method.name=local_only", "method.local_model=both"], "method.local_model: Input should be 'cache' or 'adapter'"),
    (["method.name=fedclip", "method.shots=4"], "method.shots: fedclip has no setting 'shots'"),
    (["method.name=zeroshot", "method.lr=0.1"], "method.lr: zeroshot has no setting 'lr'; it has no settings"),
    (["method.name=tip_adapter", "method.training_free=maybe"], "method.training_free: Input should be a valid boolean"),
])
def test_method_keys_are_checked_against_the_chosen_methods_settings(overrides, names):
    with pytest.raises(UserError) as info:
        load_config(None, overrides)
    assert names in str(info.value) and "\n" not in str(info.value)


def test_each_method_carries_its_reference_defaults_once():
    """Reference settings live with the method: choosing it is enough (no nulls to resolve)."""
    cachefl, fedclip = load_config(None).method, load_config(None, ["method.name=fedclip"]).method
    assert (cachefl.optimizer, cachefl.lr, cachefl.eps, cachefl.batch_size) == ("adamw", 1e-3, 1e-4, 256)
    assert (fedclip.optimizer, fedclip.lr, fedclip.betas, fedclip.loss) == ("adam", 5e-5, (0.9, 0.98), "contrastive")
    alone = load_config(None, ["method.name=local_only", "method.local_model=adapter"]).method
    assert (alone.lr, alone.batch_size, alone.loss) == (5e-5, 32, "contrastive")  # FedCLIP's, the model it trains
    scaled = load_config(None, ["method.lr_scale=10"]).method.resolved()
    assert (scaled.lr, scaled.lr_scale) == (pytest.approx(1e-2), 1.0) and scaled.resolved() == scaled


def test_per_method_settings_fill_the_chosen_method(tmp_path):
    """A sweep's base can carry settings for several methods: only the chosen one's apply."""
    path = tmp_path / "e.yaml"
    path.write_text("method: {name: fedclip}\nper_method:\n  cachefl: {shots: 4}\n  fedclip: {lr: 0.01}\n")
    assert load_config(path).method.lr == 0.01
    assert load_config(path, ["method.name=cachefl"]).method.shots == 4
    assert load_config(path, ["method.name=fedclip", "method.lr=0.1"]).method.lr == 0.1  # method.* wins
    path.write_text("per_method:\n  fedclip: {shots: 4}\n")
    with pytest.raises(UserError, match="per_method.fedclip.shots: fedclip has no setting 'shots'"):
        load_config(path)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_config(bad)
    with pytest.raises(UserError, match="expected key=value"):
        load_config(None, ["data.alpha"])


def test_cache_size_must_fit_its_source():
    check_cache_size(load_config(None))  # defaults fit: 16 shots, 16 held out, 16 synthetic
    with pytest.raises(UserError, match="method.shots=32 needs data.server_per_class >= 32"):
        check_cache_size(load_config(None, ["method.shots=32", "method.cache_init=real"]))
    with pytest.raises(UserError, match="method.shots=32 needs synth.per_class >= 32"):
        check_cache_size(load_config(None, ["method.shots=32"]))
    check_cache_size(load_config(None, ["method.shots=32", "method.cache_init=random"]))
