"""Sharded, resumable mass generation under ``torchrun`` (one process per GPU, any number of nodes).

Every rank sees the same full list of items (masks, subjects or requested samples), sorts it by item id and
takes every ``world_size``-th item from its rank on: shards are disjoint, together complete, and depend only on the
list and the number of ranks. An item's random numbers come from ``item_seed(seed, item id)`` alone
(``brainsynth.engine.seeding``: the bundles' samplers draw every item's noise from its own generators, in plain
runs too), so what an item becomes does not depend on the number of ranks, its shard, the batch size or the items
sampled before it. Outputs are written atomically; an item whose expected files all
exist is complete and is skipped when the same command runs again (never rewritten); an item with only some of
its files (an interrupted run) has those removed and is generated again. At the end rank 0 writes
``manifest.json``: every item, the rank that produced it (or ``existing``), its seed and each file's size and
SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .io import atomic_write_text
from .seeding import item_seed  # the one derivation of an item's seed (imported from here by older code)

logger = logging.getLogger("brainsynth.engine.sharding")

MANIFEST_NAME = "manifest.json"


def rank_and_world() -> tuple[int, int]:
    """(global rank, world size) of this process: torch.distributed's once initialised, else torchrun's
    environment, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def local_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` (the GPU of this rank on its own node) or the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Join the torchrun job (NCCL on GPUs, gloo on CPU) when launched by torchrun with more than one process;
    a single process runs without a process group. Returns (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.distributed.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        torch.distributed.init_process_group(backend=backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(local_device())
    return rank_and_world()


def finish_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def shard(items: Sequence[Mapping[str, Any]], key: str, rank: int, world_size: int) -> list[dict]:
    """This rank's items: the list sorted by ``item[key]``, every ``world_size``-th from position ``rank``."""
    ids = [str(item[key]) for item in items]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"item ids must be unique to shard them; repeated {key!r}: {', '.join(duplicates[:5])}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    ordered = sorted(items, key=lambda item: str(item[key]))
    return [dict(item) for item in ordered[rank::world_size]]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ShardedGeneration:
    """This rank's share of a generation run, with resume and the manifest.

    Args:
        items: every item of the run (the same list on every rank).
        key: the item field that names it uniquely (``subject``, ``name``).
        files_of: ``files_of(item)`` -> the paths the item's outputs will have (the bundle's own naming).
        output_dir: where the manifest goes.
        seed: the run seed (per-item seeds derive from it).
        resume: skip complete items (all files present); with False any existing file of this rank's items is an
            error, as in a single-process run.

    ``pending`` is what this rank still has to generate; ``finish()`` (after the evaluator ran) gathers every
    rank's record and rank 0 writes the manifest. The seed is recorded per item; the bundle's sampler draws with it.
    """

    def __init__(
        self,
        items: Sequence[Mapping[str, Any]],
        key: str,
        files_of: Callable[[Mapping[str, Any]], Sequence[str | os.PathLike]],
        output_dir: str | os.PathLike,
        seed: int = 0,
        resume: bool = True,
    ):
        self.key, self.files_of, self.seed, self.resume = key, files_of, int(seed), bool(resume)
        self.output_dir = Path(output_dir)
        self.rank, self.world_size = rank_and_world()
        self.all_items = [dict(item) for item in items]
        self.mine = shard(self.all_items, key, self.rank, self.world_size)
        self.complete: list[str] = []
        self.pending: list[dict] = []
        for item in self.mine:
            files = [Path(f) for f in files_of(item)]
            present = [f for f in files if f.exists()]
            if files and len(present) == len(files) and self.resume:
                self.complete.append(str(item[key]))
                continue
            if present and self.resume:  # an interrupted item: its outputs are remade from the same seed
                logger.warning(
                    "%s: %d of %d outputs of %s there (an interrupted run), generating it again",
                    present[0].parent,
                    len(present),
                    len(files),
                    item[key],
                )
                for f in present:
                    f.unlink()
            self.pending.append(item)
        logger.info(
            "rank %d of %d: %d item(s) in this shard, %d already complete, %d to generate",
            self.rank,
            self.world_size,
            len(self.mine),
            len(self.complete),
            len(self.pending),
        )

    def finish(self) -> Path | None:
        """Gather what every rank did; rank 0 checks that every item's files exist and writes the manifest
        atomically (replacing an earlier manifest of the same folder). Returns its path on rank 0."""
        record = {"rank": self.rank, "complete": self.complete, "generated": [str(i[self.key]) for i in self.pending]}
        records = [record]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            records = [None] * self.world_size
            torch.distributed.all_gather_object(records, record)
        if self.rank != 0:
            return None
        produced_by = {}
        for r in records:
            produced_by.update({i: "existing" for i in r["complete"]})
            produced_by.update({i: r["rank"] for i in r["generated"]})
        entries, missing = [], []
        for item in sorted(self.all_items, key=lambda it: str(it[self.key])):
            item_id = str(item[self.key])
            files = []
            for f in map(Path, self.files_of(item)):
                if not f.is_file():
                    missing.append(str(f))
                    continue
                rel = os.path.relpath(f, self.output_dir)
                files.append({"path": rel, "bytes": f.stat().st_size, "sha256": _sha256(f)})
            entries.append(
                {
                    "id": item_id,
                    "seed": item_seed(self.seed, item_id),
                    "produced_by": produced_by.get(item_id),
                    "files": files,
                }
            )
        manifest = {
            "world_size": self.world_size,
            "seed": self.seed,
            "key": self.key,
            "complete": not missing,
            "missing": missing,
            "items": entries,
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = atomic_write_text(self.output_dir / MANIFEST_NAME, json.dumps(manifest, indent=1), overwrite=True)
        if missing:
            raise RuntimeError(f"{path}: {len(missing)} expected output(s) missing after the run, e.g. {missing[0]}")
        logger.info("%s: %d item(s), all complete", path, len(entries))
        return path


def with_sidecars(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Each NIfTI path followed by its provenance sidecar (``<name>.json``): both belong to a complete output."""
    from brainsynth.data.provenance import sidecar_path

    return [p for path in paths for p in (Path(path), sidecar_path(path))]
