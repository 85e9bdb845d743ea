"""The typed experiment config: its sections and fields, each with a type, a default, a help string and its
own checks. The `method` section is the chosen method's own settings class (`Method.Settings`, see
`raycache.methods.settings`): its keys are checked against that method's. Reading it from YAML and
`key=value` overrides is `raycache.config_file`.
"""

from __future__ import annotations

import warnings

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from raycache.errors import UserError
from raycache.methods.settings import MethodSettings, settings_help


SEED_MAX = 2**32 - 1  # numpy's and torch's seeds are unsigned; every seed raycache derives stays in range


def _with_slot(templates: list[str], what: str) -> list[str]:
    """Each template has exactly one `{}` slot (the class name) and no other replacement field: `str.format`
    is what fills it, so `"{} {x}"`, `"a {} of {}"` or an unpaired brace would fail only at run time.
    Literal braces are written doubled (`{{` and `}}`), as for `str.format`."""
    from string import Formatter

    for t in templates:
        try:
            fields = [f for _, f, spec, conv in Formatter().parse(t) if f is not None or spec or conv]
        except ValueError as err:  # "Single '}' encountered", ...
            raise ValueError(f"{what} {t!r}: {err} (write a literal brace as {{{{ or }}}})") from None
        if not fields:
            raise ValueError(f"{what} {t!r} has no '{{}}' slot for the class name")
        if fields != [""]:
            raise ValueError(f"{what} {t!r} must have exactly one '{{}}' slot for the class name and no other "
                             f"replacement field (write a literal brace as {{{{ or }}}})")
        try:  # the slot's own format spec must suit a name ("{:>10}" does; "{::}" and "{:{}}" do not)
            t.format("class name")
        except Exception as err:  # noqa: BLE001 (ValueError, IndexError for a nested field, ...)
            raise ValueError(f"{what} {t!r}: {err}") from None
    return templates


class _Section(BaseModel):
    # strict: `data.clients=true` or `seed="5"` is a wrong type, not a silent 1 or 5 (ints still fill floats)
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True)


class ModelConfig(_Section):
    name: str = Field("tiny", description="open_clip architecture name (e.g. ViT-B-32) or an offline preset: "
                                          "tiny")
    pretrained: str | None = Field(None, description="open_clip pretrained tag, a local checkpoint file, or "
                                                     "'local-dir:PATH' (open_clip_config.json + weights); "
                                                     "null = random init")
    init_seed: int = Field(0, ge=0, le=SEED_MAX, description="seed for random init (pretrained: null); part of the feature key")
    templates: list[str] = Field(["a photo of a {}."], min_length=1,
                                 description="prompt templates; text embeddings are averaged over them")

    _slots = field_validator("templates")(lambda v: _with_slot(v, "template"))


class DataConfig(_Section):
    dataset: str = Field("digits", description="'digits' (scikit-learn's 8x8 digits), 'fashion_mnist' (Debian's "
                                               "dataset-fashion-mnist package), an ImageFolder directory "
                                               "(root/<class>/*.png|jpg), a folder of MNIST-style idx files, "
                                               "a .parquet file, a Hugging Face "
                                               "datasets save_to_disk folder, 'hf:<repo id>[:<config>]' (through "
                                               "the datasets cache), or the image root of data.split_file")
    class_names: str | dict[str, str] | None = Field(
        None, description="the classes' names in prompts and synthetic images: a text file with one name per "
                          "line in label order, or a mapping from the dataset's own names (e.g. ImageNet's "
                          "WordNet ids) to names; null = the dataset's names with underscores as spaces")
    split_file: str | None = Field(None, description="a CoOp / Dassl split file (split_zhou_<Dataset>.json: "
                                                     "train, val and test lists of [relative path, label, class "
                                                     "name]) whose paths are under data.dataset: exactly those "
                                                     "splits and class names (test_fraction and val_fraction "
                                                     "then do not apply)")
    shots_per_class: int | None = Field(None, ge=1, description="few-shot training: K samples per class drawn "
                                                                "(seeded) from the training split before it is "
                                                                "partitioned over clients (CoOp's protocol); "
                                                                "null = all of it")
    image_column: str = Field("image", description="Parquet column with image bytes")
    label_column: str = Field("label", description="Parquet column with labels (int or class name)")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="stratified share of samples held out as test "
                                                               "(reported, never selected on)")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="stratified share held out for validation: rounds, "
                                                             "hyperparameters and sweep trials are selected on "
                                                             "it (0 = none); for a dataset with its own train/test split "
                                                             "but no validation split, the share of its training "
                                                             "split")
    client_test_fraction: float = Field(0.0, ge=0, lt=1,
                                        description="share of each client's own samples held out as its local "
                                                    "test set, stratified within the client (FedCLIP's "
                                                    "reference: 0.2); a client too small for one is refused")
    server_per_class: int = Field(16, ge=0, description="labelled samples per class the server holds out "
                                                        "(the real-image cache init draws from them)")
    clients: int = Field(10, ge=1, description="number of (virtual) clients")
    partition: Literal["dirichlet", "iid", "shards", "domain"] = Field(
        "dirichlet", description="how training samples are split over clients; 'domain' = one client per "
                                 "domain (feature shift): ImageFolder root/<domain>/<class>/... or a Parquet "
                                 "domain column")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (smaller = more label skew)")
    min_partition_size: int = Field(0, ge=0, description="dirichlet: re-draw the partition until every client "
                                                         "holds at least this many samples (Flower Datasets' "
                                                         "semantics; 0 = never re-draw, an empty client gets one "
                                                         "sample from the largest)")
    self_balancing: bool = Field(False, description="dirichlet: a client already above the mean size gets no more "
                                                    "samples of the later classes (Flower Datasets' switch)")
    shards_per_client: int = Field(2, ge=1, description="classes' shards per client for partition: shards")
    domain_column: str = Field("domain", description="Parquet column naming each image's domain")
    test_domain: str | None = Field(None, description="leave-one-domain-out: this domain is the test set and "
                                                      "no client holds it (needs a source with domains)")

    @model_validator(mode="after")
    def _room_for_training(self) -> "DataConfig":
        if self.test_domain is None and self.test_fraction + self.val_fraction >= 1:
            raise ValueError(f"data.val_fraction: {self.val_fraction:g} + data.test_fraction {self.test_fraction:g} "
                             f"leaves nothing to train on (their sum must be below 1)")
        return self


class SynthConfig(_Section):
    generator: str = Field("stabilityai/stable-diffusion-2-1-base",
                           description="diffusers text-to-image pipeline: a hub id or local folder for "
                                       "from_pretrained, or 'tiny' (built in code, random weights, offline)")
    classes: list[str] | None = Field(None, description="class names to generate (null = the dataset's classes)")
    per_class: int = Field(16, ge=1, description="images per class (K)")
    prompts: list[str] = Field(["a photo of a {}."], min_length=1,
                               description="prompt templates with {} for the class name; image i uses template "
                                           "i mod len(prompts)")
    out: str | None = Field(None, description="output folder of Parquet shards (null = under runtime.cache_dir, "
                                              "keyed by these settings)")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="base seed; image i of class c uses a seed derived from (seed, c, i)")
    steps: int = Field(25, ge=1, description="denoising steps")
    guidance_scale: float = Field(7.5, ge=0, description="classifier-free guidance scale")
    size: int | None = Field(None, ge=8, multiple_of=8, description="image height and width in pixels, a "
                                                                     "multiple of 8 (the diffusion VAE's "
                                                                     "downsampling; null = the model's)")
    batch_size: int = Field(4, ge=1, description="images per pipeline call")
    half: bool = Field(False, description="float16 weights (GPU only)")
    allow_download: bool = Field(False, description="let a hub id download its weights; false = it must already "
                                                    "be in the local Hugging Face cache")
    actors: int = Field(1, ge=1, description="generator actors in the Ray Data pool")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per generator actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per generator actor (fractions share one GPU)")
    retries: int = Field(3, ge=0, description="times a job is rerun whose generator actor was lost (its process "
                         "or node died), the actor restarted as often; a job's images depend only on the job")

    @field_validator("classes")
    @classmethod
    def _distinct(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("the class list is empty")
        dupes = sorted({c for c in v if v.count(c) > 1})
        if dupes:
            raise ValueError(f"duplicate class name {dupes[0]!r}")
        return v

    _slots = field_validator("prompts")(lambda v: _with_slot(v, "prompt"))


class StragglerConfig(_Section):
    """A simulated delay per sampled client and round, drawn from (seed, round, client): a client whose delay
    exceeds `federation.round_deadline_s` reports too late and is left out of that round."""

    distribution: Literal["none", "exponential", "lognormal"] = Field("none", description="delay distribution")
    median_s: float = Field(1.0, gt=0, description="median simulated delay, seconds")
    sigma: float = Field(1.0, gt=0, description="lognormal: spread of log(delay)")


class DPConfig(_Section):
    """Client-level differential privacy (DP-FedAvg): clip each client's update, noise the average."""

    clip_norm: float = Field(gt=0, description="L2 bound S on each client's whole update (all keys together)")
    noise_multiplier: float = Field(gt=0, description="z: the average gets N(0, (z S / m)^2) per coordinate for "
                                                      "m clients")
    delta: float = Field(1e-5, gt=0, lt=1, description="the delta of the (epsilon, delta) spent, logged every "
                                                      "round as dp_epsilon (Opacus' RDP accountant)")


class FederationConfig(_Section):
    rounds: int = Field(5, ge=1, description="federated rounds")
    fraction: float = Field(1.0, gt=0, le=1, description="fraction of clients sampled each round")
    min_clients: int = Field(1, ge=1, description="a round with fewer successful clients fails the run")
    client_timeout_s: float | None = Field(None, gt=0, description="a client whose local training takes "
                                           "longer is dropped from the round, and a host that has not answered "
                                           "after this many seconds per client (+5 s) is replaced; null = "
                                           "automatic: a host may take 30 s plus 10x its clients' time at the slowest "
                                           "pace measured so far (doubled after each miss), no limit "
                                           "until a first client has reported")
    dropout: float = Field(0.0, ge=0, lt=1, description="fault injection: probability that a sampled client "
                                                          "does not report")
    straggler: StragglerConfig = Field(default_factory=StragglerConfig)
    round_deadline_s: float | None = Field(None, gt=0, description="simulated clients slower than this (see "
                                           "straggler) miss the round")
    weighting: Literal["samples", "uniform"] | None = Field(
        None, description="how client updates are averaged: by sample count (FedAvg) or uniformly (FedCLIP's "
                          "reference); null = the method's reference")
    strategy: Literal["fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi", "classwise"] = Field(
        "fedavg", description="what the server makes of the clients' average: fedavg = take it; fedavgm = server "
                              "momentum; fedadagrad / fedadam / fedyogi = Reddi et al.'s adaptive server "
                              "optimisers on the pseudo-gradient (average - global); classwise = cache rows "
                              "averaged per class by the clients' samples of that class (cache methods)")
    server_lr: float = Field(1.0, gt=0, description="server learning rate: x += server_lr * step (fedavgm and the "
                                                    "adaptive strategies; Reddi et al. tune it, e.g. 0.01-1)")
    server_momentum: float = Field(0.9, ge=0, lt=1, description="fedavgm: momentum of the pseudo-gradient")
    beta1: float = Field(0.9, ge=0, lt=1, description="adaptive strategies: first-moment decay")
    beta2: float = Field(0.99, ge=0, lt=1, description="fedadam / fedyogi: second-moment decay")
    tau: float = Field(1e-3, gt=0, description="adaptive strategies: adaptivity (v starts at tau^2)")
    prox_mu: float = Field(0.0, ge=0, description="FedProx: each client adds mu/2 ||w - w_global||^2 to its loss "
                                                  "(any strategy; 0 = off)")
    dp: DPConfig | None = Field(None, description="client-level differential privacy (null = off)")
    checkpoint: bool = Field(True, description="checkpoint the full server state after every round")
    server_restarts: int = Field(2, ge=0, description="times a run replaces a lost server actor (its process or "
                                 "node died) with a new federation restored from the last round's checkpoint "
                                 "(without checkpoints: every round so far replayed), before it fails")
    keep_checkpoints: int = Field(1, ge=1, description="round checkpoints kept per run: the newest this many, "
                                                       "plus the best validation round's (older ones are "
                                                       "deleted once a newer one is on disk)")
    selection: Literal["best_val", "final"] = Field(
        "best_val", description="which round's state is the run's result (checkpointed as final, reported by "
                                "compare): the one with the highest val_accuracy (earliest on ties), or the last")
    target_accuracy: float | None = Field(None, gt=0, le=1,
                                          description="validation accuracy whose first reach is logged as "
                                                      "rounds_to_target and bytes_to_target (null = none)")

    @model_validator(mode="after")
    def _dp_fits(self) -> "FederationConfig":
        if self.dp is not None and self.strategy == "classwise":
            raise ValueError("federation.dp: the noise is calibrated to a uniform average of clipped updates; "
                             "strategy classwise weighs rows by class counts (use another strategy)")
        if self.dp is not None and self.weighting == "samples":
            raise ValueError("federation.dp: the noise is calibrated to a uniform average of clipped updates; "
                             "set federation.weighting to uniform (or null)")
        return self

    @model_validator(mode="after")
    def _deadline_with_straggler(self) -> "FederationConfig":
        if self.straggler.distribution != "none" and self.round_deadline_s is None:
            raise ValueError("federation.straggler needs federation.round_deadline_s (the deadline the delays "
                             "are measured against)")
        return self


class RuntimeConfig(_Section):
    address: str | None = Field(None, description="Ray address to join (e.g. 'auto', 'ray://host:10001'); "
                                                  "null starts a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (null = all)")
    client_actors: int = Field(2, ge=1, description="actors hosting the virtual clients")
    client_cpus: float = Field(1.0, ge=0, description="CPUs per client actor (fractions allowed)")
    client_gpus: float = Field(0.0, ge=0, description="GPUs per client actor (fractions share one GPU)")
    encoder_actors: int = Field(1, ge=1, description="encoder actors in the pool a run starts once")
    encoder_cpus: float = Field(1.0, ge=0, description="CPUs per encoder actor (what Ray reserves; its torch "
                                                       "threads: runtime.encoder_threads)")
    encoder_threads: int | None = Field(None, ge=1, description="torch threads per encoder actor (null: on a "
                                        "local Ray, its CPUs shared by the actors; else ceil(encoder_cpus))")
    decode_cpus: float = Field(1.0, gt=0, description="CPUs per decode task: the Ray Data stage that reads, "
                                                      "decodes and preprocesses images for the encoder actors")
    encoder_gpus: float = Field(0.0, ge=0, description="GPUs per encoder actor (fractions share one GPU)")
    encoder_batch_size: int = Field(128, ge=1, description="images per encoder batch")
    encode_retries: int = Field(3, ge=0, description="times a batch is rerun whose decode task or encoder actor "
                                "was lost (its process or node died), the actor restarted as often; a batch's "
                                "features depend on nothing else, so a rerun gives the same rows")
    look_ahead: bool = Field(True, description="start each round's training on the client actors right behind "
                             "the previous round's evaluation, while the driver writes and reports that round "
                             "(the same results; off: a round starts when the driver asks for it)")
    cache_dir: str = Field(".raycache", description="where encoded features persist across runs")


# `register` names a field that ABCMeta.register (pydantic's metaclass) also names on the class: harmless (a
# config's `tracking.register` is the field), but pydantic warns on every import.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "register"')

    class TrackingConfig(_Section):
        experiment: str = Field("raycache", min_length=1, description="MLflow experiment name")
        run_name: str | None = Field(None, description="MLflow run name (null = generated)")
        register: str | None = Field(None, min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                                     description="register the run's model under this name in MLflow's model "
                                     "registry (a new version each run; null: not registered)")
        copy_weights: bool = Field(False, description="copy a local model.pretrained file or folder into the run's "
                                   "MLflow model, which then stands on its own (false: referenced, and checked "
                                   "against its fingerprint when the model is loaded)")
        flush_seconds: float = Field(1.0, ge=0.0, description="write rounds to MLflow at most this often: a round's "
                                     "metrics and checkpoint link wait, in its checkpoint file, until this many "
                                     "seconds have passed since the last write, and go with the next (0: every "
                                     "round as it ends; a sweep's trials and runs without checkpoints always do)")


DEFAULT_METHOD = "cachefl"


def method_settings(section) -> MethodSettings:
    """A `method` section (a mapping) validated by its method's settings class; a ValueError naming the
    dotted key otherwise (an unknown key lists the method's own keys)."""
    from raycache.methods import method_class, method_names

    if not isinstance(section, dict):
        raise ValueError(f"method: expected a mapping of settings, got {type(section).__name__}")
    name = section.get("name", DEFAULT_METHOD)
    section = {**section, "name": name}
    if not isinstance(name, str) or name not in method_names():
        raise ValueError(f"method.name: unknown method {name!r}; choose one of: {', '.join(method_names())}")
    settings_cls = method_class(name).Settings
    keys = settings_help(settings_cls)
    for key in section:
        if key != "name" and key not in keys:
            have = f"its settings: {', '.join(sorted(keys))}" if keys else "it has no settings"
            raise ValueError(f"method.{key}: {name} has no setting {key!r}; {have}")
    try:
        return settings_cls.model_validate(section)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if msg.startswith("method."):
            raise ValueError(msg) from None
        where = f"method.{loc}" if loc else "method"
        got = f" (got {e['input']!r})" if loc and "input" in e and not e["type"].startswith("value_error") else ""
        raise ValueError(f"{where}: {msg}{got}") from None


def settings_for(name: str = DEFAULT_METHOD, **settings) -> MethodSettings:
    """The settings of method `name` (its reference where not given), e.g. `settings_for("flora", lora_rank=4)`."""
    return method_settings({"name": name, **settings})


class ExperimentConfig(_Section):
    seed: int = Field(0, ge=0, le=SEED_MAX, description="seed for splits, partitions, client sampling and local training")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    method: SerializeAsAny[MethodSettings] = Field({"name": DEFAULT_METHOD}, validate_default=True)
    synth: SynthConfig = SynthConfig()
    federation: FederationConfig = FederationConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("method", mode="before")
    @classmethod
    def _method_settings(cls, v):
        """The chosen method's own settings class validates the section."""
        if isinstance(v, MethodSettings):
            return v
        return method_settings(v)

    @model_validator(mode="after")
    def _selection_needs_validation(self) -> "ExperimentConfig":
        if self.data.val_fraction == 0:
            if self.federation.selection == "best_val":
                raise ValueError("federation.selection: best_val selects on the validation split, but "
                                 "data.val_fraction is 0; set data.val_fraction > 0 or selection: final")
            if self.federation.target_accuracy is not None:
                raise ValueError("federation.target_accuracy: is measured on validation accuracy, but "
                                 "data.val_fraction is 0")
        return self

    def flat(self) -> dict[str, Any]:
        """Every field as a dotted key, for MLflow params and tables."""
        return flatten(self.model_dump())


def check_cache_size(cfg: ExperimentConfig) -> None:
    """K images per class must exist where the cache draws them from (for methods that build a cache)."""
    m = cfg.method
    if m.cache_init == "real" and m.shots > cfg.data.server_per_class:
        raise UserError(f"config error: method.shots={m.shots} needs data.server_per_class >= {m.shots} "
                        f"(the real-image cache draws K per class from the server's held-out split)")
    if m.cache_init == "synthetic" and m.shots > cfg.synth.per_class:
        raise UserError(f"config error: method.shots={m.shots} needs synth.per_class >= {m.shots} "
                        f"(the synthetic cache takes K images per class)")


MAPPING_KEYS = {"data.class_names"}  # values that are mappings, logged whole (as JSON), not one key per entry


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    import json

    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if key in MAPPING_KEYS and isinstance(v, dict):
            out[key] = json.dumps(v, sort_keys=True)
        elif isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of `model`; the `method` section's are those of every registered method."""
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if name == "method" and model is ExperimentConfig:
            from raycache.methods import method_class, method_names

            keys += sorted({f"method.{k}" for m in method_names() for k in method_class(m).Settings.model_fields})
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += known_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys
