"""A finished run's result as an MLflow model (`pyfunc` flavour) and the classifier that model loads.

`log_model` writes, under the run's `model` artifact, an MLflow model whose data folder holds `raycache.json`
(the open_clip model spec and its weights' fingerprint, the method and its settings, the class names and
prompt templates, the selected round) and `result.safetensors` (the selected state: the run's
`final.safetensors`). The flavour's loader is this module (`loader_module`): loading builds the classifier
from those files with raycache's own code, nothing is unpickled. The base CLIP weights are referenced, not
copied (a pretrained tag resolves the same weights anywhere; a local file or folder is checked against its
fingerprint when loaded); `tracking.copy_weights: true` copies a local weights file or folder into the
model, which then stands on its own.

    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    model.predict(pd.DataFrame({"image": ["cat.png", open("dog.jpg", "rb").read()]}))
    #   class  score  label      (a personal method's run: predict(..., params={"client": 3}))

Images go through the training pipeline's own code: `decode_views` (decode, the model's eval transform) and
`ImageEncoder` for a method that reads features, `ImageRows` for one that reads pixels.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
import numpy as np

from raycache.errors import UserError

FORMAT = "raycache-model/1"
SPEC = "raycache.json"
RESULT = "result.safetensors"
WEIGHTS = "weights"
ARTIFACT = "model"  # the run's artifact folder: runs:/<run id>/model
MODEL_TAG = "raycache.model"
BATCH = 64  # images per encoder call when predicting


def model_uri(run_id: str) -> str:
    return f"runs:/{run_id}/{ARTIFACT}"


def _local_weights(pretrained: str | None) -> Path | None:
    """The local file or folder `model.pretrained` names (None: a tag, or random init)."""
    from raycache.models.clip import LOCAL_DIR

    if pretrained is None:
        return None
    path = Path(pretrained.removeprefix(LOCAL_DIR))
    return path if path.exists() else None


def write_model_data(folder: Path, cfg, task, result_file: Path, run_id: str, result_round: int) -> Path:
    """The model's data folder: the spec, the selected state, and (`tracking.copy_weights`) the weights."""
    folder.mkdir(parents=True)
    model = cfg.model.model_dump()
    weights = _local_weights(cfg.model.pretrained)
    copied = None
    if cfg.tracking.copy_weights and weights is not None:
        copied = f"{WEIGHTS}/{weights.name}"
        target = folder / copied
        target.parent.mkdir()
        (shutil.copytree if weights.is_dir() else shutil.copy2)(weights, target)
    shutil.copy2(result_file, folder / RESULT)
    spec = {"format": FORMAT, "run_id": run_id, "round": result_round, "model": model,
            "weights_fingerprint": task.spec.fingerprint(), "copied_weights": copied,
            "method": cfg.method.model_dump(), "class_names": list(task.class_names),
            "templates": list(task.templates)}
    (folder / SPEC).write_text(json.dumps(spec, indent=1))
    return folder


def publish(cfg, run, task, result: dict) -> str:
    """A finished run's result, made usable: its state file beside the checkpoints (`resume.save_result`),
    the MLflow model logged from it and, with `tracking.register`, registered. Returns the model's URI and
    logs the time it took as `time_model_s`."""
    import time

    from raycache.resume import save_result

    t = time.perf_counter()
    uri = log_model(cfg, run, task, save_result(cfg, run, result), result["round"])
    if cfg.tracking.register is not None:
        version = run.register_model(uri, cfg.tracking.register)
        run.set_tags({"raycache.registered_model": f"{cfg.tracking.register}/{version}"})
    run.log_metrics({"time_model_s": time.perf_counter() - t})
    return uri


def log_model(cfg, run, task, result_file: Path, result_round: int) -> str:
    """Log the run's result as its `model` artifact (an MLflow pyfunc model); returns the model's URI."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="raycache-model-") as tmp:
        data = write_model_data(Path(tmp) / "data", cfg, task, result_file, run.run_id, result_round)
        # `client`: a personal method's client whose state predicts (-1: none given)
        uri = run.log_pyfunc_model(ARTIFACT, data, __name__, _requirements(), {"client": -1})
    run.set_tags({MODEL_TAG: uri})
    return uri


def _requirements() -> list[str]:
    """What loading the model needs: raycache and the libraries it runs the model with, at these versions."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("raycache", "torch", "open_clip_torch", "numpy", "pillow", "safetensors"):
        try:
            out.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            out.append(dist)
    return out


class Classifier:
    """A run's trained classifier: images (file paths or encoded bytes) in, class names and scores out."""

    def __init__(self, data: Path) -> None:
        from raycache.config import ModelConfig, method_settings
        from raycache.federation import checkpoint
        from raycache.methods import method_class
        from raycache.methods.base import Task
        from raycache.models.clip import LOCAL_DIR, ModelSpec, load_clip
        from raycache.models.text import text_classifier

        try:
            info = json.loads((data / SPEC).read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"model: {data / SPEC} is missing or damaged ({type(err).__name__})") from None
        if info.get("format") != FORMAT:
            raise UserError(f"model: {data} is not a raycache model")
        model = dict(info["model"])
        if info.get("copied_weights"):  # the model carries its weights: they are the run's
            path = str(data / info["copied_weights"])
            model["pretrained"] = (LOCAL_DIR + path) if str(info["model"]["pretrained"]).startswith(LOCAL_DIR) \
                else path
        self.spec = ModelSpec.from_config(ModelConfig(**model))
        if not info.get("copied_weights") and self.spec.fingerprint() != info["weights_fingerprint"]:
            raise UserError(f"model.pretrained: the weights at {self.spec.pretrained} are not the ones run "
                            f"{info['run_id']} trained on (fingerprint {self.spec.fingerprint()}, the run's "
                            f"{info['weights_fingerprint']}); restore them, or log the model with "
                            f"tracking.copy_weights: true")
        self.run_id, self.round = info["run_id"], info["round"]
        self.class_names = list(info["class_names"])
        self._clip, self.transform, tokenizer = load_clip(self.spec)
        clip = self._clip
        task = Task(self.class_names, text_classifier(clip, tokenizer, self.class_names, info["templates"]),
                    self.spec, tuple(info["templates"]))
        settings = method_settings(info["method"])
        cls = method_class(settings.name)
        self.method = cls(settings, task)
        self.flow = cls.flow
        self.uses_pixels = cls.uses_pixels(settings)
        self.snapshot = checkpoint.load(data / RESULT, what="model").snapshot
        self.clients = len(self.snapshot["reached"])
        self._encoder = None

    def get_raw_model(self) -> "Classifier":
        """What `PyFuncModel.get_raw_model()` returns: this classifier (class names, scores, `per_client`)."""
        return self

    @property
    def per_client(self) -> bool:
        return self.flow.per_client

    def state(self, client: int | None):
        if self.per_client:
            if client is None:
                raise UserError(f"--client: run {self.run_id} trained a state per client ({self.clients} "
                                f"clients); choose whose state predicts with --client N (0 to {self.clients - 1})")
            if not 0 <= client < self.clients:
                raise UserError(f"--client: {client} is not a client of run {self.run_id} (0 to "
                                f"{self.clients - 1})")
        return self.flow.result_state(self.snapshot, client)

    def inputs(self, images: list[bytes], keys: list[str]):
        """What the method reads: features through the training pipeline's encoder, or the images."""
        if self.uses_pixels:
            from raycache.data.pixels import ImageRows

            offsets = np.concatenate([[0], np.cumsum([len(b) for b in images])]).astype(np.int64)
            data = np.frombuffer(b"".join(images), np.uint8).copy()
            return ImageRows(data, offsets, np.asarray(keys), self.transform)
        import torch

        from raycache.data.encoders import ImageEncoder
        from raycache.data.features import decode_views

        if self._encoder is None:
            self._encoder = ImageEncoder(self.spec, use_gpu=False, threads=torch.get_num_threads(),
                                         transform=self.transform, model=self._clip)
        parts = []
        for i in range(0, len(images), BATCH):
            batch = {"image": np.asarray(images[i:i + BATCH], dtype=object), "key": np.asarray(keys[i:i + BATCH])}
            parts.append(self._encoder(decode_views(batch, self.transform))["features"])
        return np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)

    def scores(self, images: list[bytes], keys: list[str], client: int | None = None) -> np.ndarray:
        """(n, classes) class probabilities (the softmax of the method's logits)."""
        from raycache.federation.evaluate import logits

        state = self.state(client)
        z = logits(lambda x: self.method.logits(state, x), self.inputs(images, keys), self.method.eval_batch)
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, model_input, params: dict | None = None):
        """MLflow's pyfunc call: a DataFrame whose `image` column (or first column) holds file paths or
        encoded bytes -> a DataFrame of `class`, `score` and `label` (the class's index), one row per image.
        `params={"client": N}` picks a personal method's client."""
        import pandas as pd

        if isinstance(model_input, pd.DataFrame):
            column = model_input["image"] if "image" in model_input else model_input.iloc[:, 0]
            values = list(column)
        else:
            values = list(model_input)
        images, keys = read_images(values)
        client = (params or {}).get("client")
        client = None if client is None or int(client) < 0 else int(client)
        p = self.scores(images, keys, client)
        label = p.argmax(axis=1) if len(p) else np.zeros(0, np.int64)
        return pd.DataFrame({"class": [self.class_names[i] for i in label],
                             "score": p[np.arange(len(p)), label] if len(p) else [], "label": label})


def read_images(values: list) -> tuple[list[bytes], list[str]]:
    """File paths or encoded bytes -> (bytes, a name for each in messages)."""
    images, keys = [], []
    for i, v in enumerate(values):
        if isinstance(v, (bytes, bytearray, memoryview)):
            images.append(bytes(v))
            keys.append(f"image {i}")
            continue
        path = Path(str(v))
        try:
            images.append(path.read_bytes())
        except OSError as err:
            raise UserError(f"{path}: cannot read image ({err.strerror})") from None
        keys.append(str(path))
    return images, keys


def _load_pyfunc(data_path: str) -> Classifier:
    """MLflow's loader-module entry point: the model's data folder -> its classifier."""
    return Classifier(Path(data_path))
