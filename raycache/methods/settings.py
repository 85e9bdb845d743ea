"""Per-method settings: the `method` section of an experiment is the chosen method's own settings class.

Every method declares `Settings`, a typed model whose fields are exactly the `method.<key>` keys it takes, each
with its reference default and a help string; `method.lora_rank` on `cachefl` is an unknown key of
`cachefl`'s settings. The building blocks here are shared by families of methods (every trainable method has
an optimiser and a schedule; every cache method a cache size); `reference(Base, name, **defaults)` makes a
method's class with its paper's defaults, stated once, beside the method.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator
from pydantic.fields import FieldInfo


class MethodSettings(BaseModel):
    """What every method has: its name."""

    # strict: `method.lr=true` is a wrong type, not a silent 1 (ints still fill floats)
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True,
                              ser_json_inf_nan="constants")  # inf survives JSON (the preflight process)

    name: str = Field(description="federated method; see `raycache methods`")

    def resolved(self) -> "MethodSettings":
        """The settings the run trains with (derived values folded in); resolving twice changes nothing."""
        return self


class TrainSettings(MethodSettings):
    """A method that trains: its local optimiser, schedule and budget (one loop, `methods.training.fit`)."""

    lr: float = Field(1e-3, gt=0, description="local learning rate")
    lr_scale: float = Field(1.0, gt=0, description="multiplies lr: a sweep over it tunes every method around its "
                                                   "own reference; folded into lr (and reset to 1) when resolved")
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="local optimiser: adam (coupled L2 "
                                                                           "weight decay), adamw (decoupled) "
                                                                           "or sgd (with momentum)")
    betas: tuple[float, float] = Field((0.9, 0.999), strict=False, description="adam/adamw betas, each in [0, 1)")
    eps: float = Field(1e-8, gt=0, description="adam/adamw epsilon")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd momentum")
    weight_decay: float = Field(0.0, ge=0, description="weight decay")
    local_epochs: int = Field(1, ge=1, description="local epochs per round")
    batch_size: int = Field(32, ge=1, description="local minibatch size")
    schedule: Literal["cosine", "cosine_run", "constant"] = Field(
        "constant", description="learning-rate schedule (a factor of lr set every batch, as torch's LambdaLR "
                                "does): cosine over a client's steps in a round, cosine_run = one cosine over "
                                "the whole run (round r continues where round r-1 stopped: Tip-Adapter-F's and "
                                "CoOp's), or constant")
    warmup_epochs: int = Field(0, ge=0, description="epochs of the run trained at the constant warmup_lr before "
                                                    "the schedule starts (CoOp's constant warm-up: 1)")
    warmup_lr: float = Field(1e-5, gt=0, description="the learning rate during warm-up")
    persist_optimizer: bool = Field(False, description="keep each client's optimiser state (moments, step count) "
                                                       "across rounds, private to the client and never sent; "
                                                       "false = a fresh optimiser every round")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):  # torch's Adam refuses them too, but only inside an actor
            raise ValueError(f"each beta must be in [0, 1), got {list(v)}")
        return v

    def resolved(self) -> "TrainSettings":
        if self.lr_scale == 1.0:
            return self
        return self.model_copy(update={"lr": self.lr * self.lr_scale, "lr_scale": 1.0})


class LossSettings(TrainSettings):
    """A method that matches image and text embeddings: which loss it trains with."""

    loss: Literal["ce", "contrastive"] = Field("ce", description="cross-entropy over the class logits, or the "
                                                                 "symmetric CLIP contrastive loss between each "
                                                                 "image and its class prompt (FedCLIP's)")


class CacheSettings(TrainSettings):
    """A Tip-Adapter cache: K keys per class, their source, the residual's alpha and beta, the search."""

    shots: int = Field(16, ge=1, description="cache size K per class")
    cache_init: Literal["synthetic", "real", "shots", "random"] = Field(
        "synthetic", description="where the cache keys come from: 'synthetic' = class-balanced images from a "
                                 "text-to-image model (see synth.*; CacheFL's), 'real' = the server's held-out "
                                 "labelled images, 'shots' = K per class drawn from the training pool, which is "
                                 "then all the method trains on (Tip-Adapter's few-shot setting; pooled methods "
                                 "only), 'random' = random unit vectors")
    alpha: float = Field(1.0, ge=0, description="Tip-Adapter residual ratio (weight of the cache logits)")
    beta: float = Field(1.0, gt=0, description="Tip-Adapter sharpness of the affinity exp(-beta(1-f.k))")
    augment_views: int = Field(10, ge=1, description="each cache key is the mean of this many augmented views' "
                                                     "raw features (RandomResizedCrop scale 0.5-1 + horizontal "
                                                     "flip), then normalised; Tip-Adapter's reference: 10; 1 = "
                                                     "the plain centre crop")
    search: bool = Field(True, description="after training, grid-search alpha and beta on the validation split "
                                           "(Tip-Adapter's search) and report the result with the best pair")
    search_scale: tuple[float, float] = Field((7.0, 3.0), strict=False,
                                              description="the search's upper ends (beta, alpha); both grids "
                                                          "start at 0.1 (Tip-Adapter's per-dataset search_scale)")
    search_step: tuple[int, int] = Field((200, 20), strict=False,
                                         description="grid points for (beta, alpha) (Tip-Adapter's search_step)")

    shots_from_clients: ClassVar[bool] = False  # may the keys be the clients' own images (pooled methods only)

    @field_validator("search_scale")
    @classmethod
    def _scale_above_start(cls, v: tuple[float, float]) -> tuple[float, float]:
        if min(v) <= 0.1:
            raise ValueError(f"both upper ends must exceed the grids' start 0.1, got {list(v)}")
        return v

    @field_validator("search_step")
    @classmethod
    def _positive_steps(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 1:
            raise ValueError(f"both step counts must be at least 1, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _shots_only_when_pooled(self) -> "CacheSettings":
        if self.cache_init == "shots" and not self.shots_from_clients:
            raise ValueError(f"method.cache_init: shots puts the clients' own images in the cache, which only a "
                             f"pooled (centralised) method may do; {self.name} trains on clients")
        return self


class PooledCacheSettings(CacheSettings):
    """A cache trained by one party on pooled data, which may take its keys from the training pool."""

    shots_from_clients: ClassVar[bool] = True


def reference(base: type[MethodSettings], name: str, doc: str | None = None, **defaults: Any) -> type:
    """`base` with a method's reference defaults: a new settings class named `name` whose fields keep their
    types, bounds and help, with these defaults."""
    fields: dict[str, Any] = {}
    for key, value in defaults.items():
        if key not in base.model_fields:
            raise TypeError(f"{name}: {base.__name__} has no setting {key!r}")
        info = base.model_fields[key]
        fields[key] = (info.annotation, FieldInfo.merge_field_infos(info, default=value))
    cls = create_model(name, __base__=base, **fields)
    cls.__doc__ = doc or base.__doc__
    return cls


def settings_help(cls: type[MethodSettings]) -> dict[str, tuple[Any, str]]:
    """{key: (default, help)} for every setting but the name (for `raycache methods` and error messages)."""
    return {k: (f.default, f.description or "") for k, f in cls.model_fields.items()
            if k != "name"}
