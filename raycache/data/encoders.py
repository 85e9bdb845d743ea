"""The encoder pool: Ray actors that each hold the CLIP model and turn decoded blocks into features, fed in
the source's order by the driver, block by block, as the decode stage (`features.decoded`, Ray Data tasks)
makes them.

A run starts its pool once (beside its model's preflight process, where the store lacks what it encodes:
`ray_session.EarlyStart`; else at its first encode), and its encodes use it: the dataset's features, the
cache's augmented keys (a synthetic cache stops it while the generator's actors run; its next encode starts
it again). Starting an encoder is a fresh process importing torch and open_clip and building the model
(about 6 s for ViT-B-32 on this project's 2-core machines), which a Ray Data actor pool pays again at every
pipeline; a pool started early does that work beside other work. The blocks travel from the decode tasks
to the actors through the object store by reference (the driver holds refs, never pixels); the features
come back to the driver, which writes them.
"""

from __future__ import annotations

import uuid
from collections import deque
from typing import Iterable, Iterator

import numpy as np

from raycache.data.transforms import augmented_tensor_stage, split_at_tensor
from raycache.errors import UserError
from raycache.models.clip import ModelSpec

IN_FLIGHT = 2  # blocks queued per actor: one encoding, one waiting, so an actor never idles between blocks


class ImageEncoder:
    """The pipeline's model stage (held by an `EncoderActor`, or by a served model): one model,
    (B, views, 3, H, W) pixels in, (B, D) features out (the mean over the views). It only runs the model and
    the transform's tensor stage (uint8 pixels scaled to [0, 1] and normalised on the actor's device, exactly
    as `ToTensor` and `Normalize` would): decoding and the PIL work happen in `decode_block` tasks upstream,
    so the actor's CPUs (or its GPU) never wait on PIL.

    Features are the raw `encode_image` output (not normalised): FedCLIP's adapter reads them as they come
    from CLIP (its reference normalises only after the adapter); every other method normalises them itself."""

    def __init__(self, spec: ModelSpec, use_gpu: bool, threads: int = 1, transform=None, model=None,
                 views: int = 1) -> None:
        """`model`: the CLIP of `spec`, already loaded on this process (a served model's), else loaded here.
        `transform`: the model's eval preprocessing, whose tensor stage runs here (the augmentation's, for
        `views` > 1: decoded in the same way upstream)."""
        import torch

        from raycache.models.clip import load_clip

        import warnings

        torch.set_num_threads(max(1, threads))  # Ray would set one thread per reserved CPU
        # blocks arrive read-only from the object store; the model only reads them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model = load_clip(spec, device=self.device)[0] if model is None else model.to(self.device)
        self.set_stage(transform, views)

    def set_stage(self, transform, views: int = 1) -> None:
        """The tensor stage of `transform` (the augmentation's, for `views` > 1) runs from now on."""
        self.tensor_stage = None
        if transform is not None:
            self.tensor_stage = augmented_tensor_stage(transform) if views > 1 else split_at_tensor(transform)[1]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        pixels = torch.from_numpy(batch["pixels"])  # (B, V, 3, H, W)
        b, v = pixels.shape[:2]
        with torch.no_grad():
            x = pixels.flatten(0, 1).to(self.device, non_blocking=True)
            if x.dtype == torch.uint8:  # the PIL stage's output: ToTensor's scaling, then the rest (Normalize)
                # divided by a tensor, not a Python number: CUDA turns x / 255 into x * (1 / 255)
                x = self.tensor_stage(x.float().div(torch.tensor(255.0, device=x.device)))
            feats = self.model.encode_image(x).float()  # (B * V, D), raw
            # Tip-Adapter's cache key: the mean of the views' raw features (normalised by the method)
            feats = feats.reshape(b, v, -1).mean(dim=1)  # (B, D)
        # The encoder's own count of images it pushed through the model, on the batch's first row: the
        # driver's sum is the number of encoder calls, checked against the number of distinct images.
        calls = np.zeros(b, dtype=np.int64)
        calls[0] = b * v  # every view counts as an encoder call
        return {"features": feats.cpu().numpy(), "encoder_images": calls}


def encoder_plan(runtime) -> tuple[int, float, int]:
    """(actors, CPUs per actor, torch threads per actor) of the encoder pool, sized so that a read/decode
    task always fits beside it.

    On a local Ray the pool and the stage that feeds it share a fixed set of CPUs: a pool that took them all
    would leave the read and decode tasks waiting for ever (two 1-CPU actors on 2 CPUs once did). A pool that
    does not fit beside one task of `max(1, decode_cpus)` CPUs (a read that is not fused into the decode
    stage, e.g. parquet's, takes 1) is sized down, said in one line on stderr, and refused when not even
    one actor fits. Ray's CPUs are a reservation, not a thread count: the actors' torch threads share the
    local Ray's CPUs (decoding is light beside the model), unless `runtime.encoder_threads` says otherwise.
    On a cluster the autoscaler adds nodes, so the configured pool stands, with ceil(encoder_cpus) threads
    per actor."""
    import math
    import sys

    import ray

    actors, cpus = runtime.encoder_actors, runtime.encoder_cpus
    if runtime.address is not None:
        return actors, cpus, runtime.encoder_threads or max(1, math.ceil(cpus))
    have = ray.cluster_resources().get("CPU", 0.0)
    stage = max(1.0, runtime.decode_cpus)
    spare = have - stage
    if cpus > spare + 1e-9:
        raise UserError(f"runtime.encoder_cpus: an encoder actor with {cpus:g} CPU beside a read/decode task "
                        f"({stage:g} CPU) does not fit this Ray's {have:g} CPUs")
    fit = int((spare + 1e-9) // cpus) if cpus > 0 else actors
    if fit < actors:
        print(f"raycache: runtime.encoder_actors={actors} x {cpus:g} CPU leave no CPU for reading and decoding "
              f"on this Ray's {have:g} CPUs; encoding with {fit}", file=sys.stderr)
        actors = fit
    return actors, cpus, runtime.encoder_threads or max(1, int(have) // actors)


class EncoderActor:
    """One encoder per process (`ImageEncoder`); the transform's tensor stage comes with each call
    (a pool serves encodes of other transforms and view counts) and is built once per encode."""

    def __init__(self, spec: ModelSpec, use_gpu: bool, threads: int) -> None:
        self.encoder = ImageEncoder(spec, use_gpu, threads)
        self.token = None

    def ready(self) -> bool:
        return True

    def encode(self, block, piece: tuple[int, int] | None, token: str, transform, views: int) -> dict:
        """Features of one decoded block (rows `piece` of it, if given), for the encode `token` names."""
        from ray.data.block import BlockAccessor

        if token != self.token:
            self.encoder.set_stage(transform, views)
            self.token = token
        acc = BlockAccessor.for_block(block)
        if piece is not None:
            acc = BlockAccessor.for_block(acc.slice(piece[0], piece[1], copy=False))
        return self.encoder(acc.to_batch_format("numpy"))


class EncoderPool:
    """`runtime.encoder_actors` encoder actors for `spec` (sized by `encoder_plan` to fit beside
    the decode tasks on a local Ray), started by `start` or at the first `map`, stopped by `close`.

    A lost actor (its process or node died) is restarted and its blocks rerun, `runtime.encode_retries`
    times over the pool's life (a block's features depend on that block alone); an exception a block
    raises is not retried: it fails the encode, which stops the pool (its next encode starts it afresh)."""

    def __init__(self, spec: ModelSpec, runtime) -> None:
        self.spec, self.runtime = spec, runtime
        self.actors: list = []

    def fits(self, spec: ModelSpec, runtime) -> bool:
        """Whether this pool encodes as a pool made for (`spec`, `runtime`) would."""
        mine, theirs = self.runtime, runtime
        return spec == self.spec and all(getattr(mine, k) == getattr(theirs, k) for k in (
            "encoder_actors", "encoder_cpus", "encoder_gpus", "encoder_threads", "encode_retries", "decode_cpus"))

    def start(self) -> "EncoderPool":
        """Ask Ray for the actors; they import and build the model while the caller goes on."""
        if self.actors:
            return self
        import ray

        rt = self.runtime
        actors, cpus, threads = encoder_plan(rt)
        cls = ray.remote(EncoderActor).options(num_cpus=cpus, num_gpus=rt.encoder_gpus,
                                               max_restarts=rt.encode_retries, max_task_retries=rt.encode_retries)
        self.actors = [cls.remote(self.spec, rt.encoder_gpus > 0, threads) for _ in range(actors)]
        return self

    def wait(self) -> "EncoderPool":
        """Started, and every actor's model built."""
        import ray

        ray.get([actor.ready.remote() for actor in self.start().actors])
        return self

    def map(self, blocks: Iterable, transform, views: int = 1) -> Iterator[dict]:
        """Each of `blocks` (a ref to a decoded block, or (ref, (start, end)) for rows of one) encoded, in
        the order given; at most `IN_FLIGHT` blocks wait on each actor."""
        import ray

        self.start()
        token, stage = uuid.uuid4().hex, ray.put(transform)
        busy = [0] * len(self.actors)
        pending: deque = deque()  # (features ref, actor index), in the blocks' order
        for item in blocks:
            ref, piece = item if isinstance(item, tuple) else (item, None)
            while len(pending) >= IN_FLIGHT * len(self.actors):
                yield self._take(pending, busy)
            i = min(range(len(busy)), key=busy.__getitem__)
            busy[i] += 1
            pending.append((self.actors[i].encode.remote(ref, piece, token, stage, views), i))
        while pending:
            yield self._take(pending, busy)

    @staticmethod
    def _take(pending: deque, busy: list[int]) -> dict:
        import ray

        ref, i = pending.popleft()
        busy[i] -= 1
        return ray.get(ref)

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> "EncoderPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def block_pieces(bundles: Iterable) -> Iterator:
    """The blocks of Ray Data's output bundles (`Dataset.iter_internal_ref_bundles`) as `EncoderPool.map`
    takes them: a ref, or (ref, (start, end)) where a bundle holds only rows of a block."""
    for bundle in bundles:
        refs = bundle.block_refs
        slices = getattr(bundle, "slices", None) or [None] * len(refs)
        for ref, piece in zip(refs, slices):
            yield ref if piece is None else (ref, (piece.start_offset, piece.end_offset))
