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

from raycache.models.clip import ModelSpec

IN_FLIGHT = 2  # blocks queued per actor: one encoding, one waiting, so an actor never idles between blocks


class EncoderActor:
    """One encoder per process (`features.ImageEncoder`); the transform's tensor stage comes with each call
    (a pool serves encodes of other transforms and view counts) and is built once per encode."""

    def __init__(self, spec: ModelSpec, use_gpu: bool, threads: int) -> None:
        from raycache.data.features import ImageEncoder

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
    """`runtime.encoder_actors` encoder actors for `spec` (sized by `features.encoder_plan` to fit beside
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

        from raycache.data.features import encoder_plan

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
