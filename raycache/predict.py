"""`raycache predict RUN_ID PATH...`: classify image files and folders with a finished run's MLflow model.

The model is loaded the way any MLflow user loads it (`mlflow.pyfunc.load_model("runs:/<run id>/model")`), and
its classifier encodes the images with the training pipeline's own code, `BATCH` at a time. One line per image
(path, class, score) on stdout, or a CSV with `--out` (written whole or not at all).
"""

from __future__ import annotations

import csv
import io
import re
import sys
from pathlib import Path

from raycache.errors import UserError

CHUNK = 512  # images read and classified at a time: memory holds one chunk's encoded bytes and features


def image_files(paths: list[str]) -> list[Path]:
    """The files named, and the images (.png, .jpg, .jpeg) under the folders named, in order; one line for a
    path that does not exist or a folder without images."""
    from raycache.data.sources.imagefolder import images_under

    out: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = images_under(path)
            if not found:
                raise UserError(f"{path}: no .png, .jpg or .jpeg images under this folder")
            out += found
        elif path.is_file():
            out.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return out


def find_run(run_id: str):
    """The MLflow run `run_id`; one line for an id that is not one, or names no run."""
    from raycache.tracking import logged_run, masked, tracking_uri

    if not re.fullmatch(r"[0-9a-f]{32}", run_id):
        raise UserError(f"RUN_ID: {run_id!r} is not an MLflow run id (32 hexadecimal characters)")
    run = logged_run(run_id)
    if run is None:
        raise UserError(f"RUN_ID: no MLflow run {run_id} in {masked(tracking_uri())}")
    return run


def load_classifier(run_id: str):
    """The run's model, through MLflow's pyfunc loader; one line for a run that has none."""
    from raycache.serving import model_uri
    from raycache.tracking import load_pyfunc

    run = find_run(run_id)
    try:
        return load_pyfunc(model_uri(run_id))
    except LookupError as err:
        why = "it did not finish" if run.status != "FINISHED" else "it logged none"
        raise UserError(f"RUN_ID: run {run_id} has no model ({why}; {err})") from None


def predict_files(run_id: str, paths: list[str], out: str | None, client: int | None) -> int:
    from raycache.serving import read_images

    find_run(run_id)
    files = image_files(paths)
    model = load_classifier(run_id)
    model.state(client)  # a personal method's run needs --client: say so before reading any image
    if client is not None and not model.per_client:
        print(f"raycache: run {run_id} has one global state; --client {client} changes nothing", file=sys.stderr)
    if model.per_client:
        print(f"raycache: predicting with client {client}'s own state", file=sys.stderr)
    buf = io.StringIO()
    writer = csv.writer(buf) if out else None
    if writer:
        writer.writerow(["path", "class", "score"])
    for i in range(0, len(files), CHUNK):
        chunk = files[i:i + CHUNK]
        images, keys = read_images([str(f) for f in chunk])
        scores = model.scores(images, keys, client)
        for path, p in zip(chunk, scores):
            k = int(p.argmax())
            if writer:
                writer.writerow([str(path), model.class_names[k], f"{p[k]:.6f}"])
            else:
                print(f"{path}\t{model.class_names[k]}\t{p[k]:.4f}")
    if out:
        from raycache.storage import write_atomic

        write_atomic(Path(out), lambda tmp: tmp.write_text(buf.getvalue()), what="predictions")
        print(f"raycache: {len(files)} predictions in {out}", file=sys.stderr)
    return 0
