"""Build a teacher embedding cache (``distill cache``): resumable, deterministic, one shard per process.

    distill cache --data ShapesWorldDataModule --data.num_train 8000 \\
        --teacher.teacher.model_name local-dir:runs/demo/teacher/open_clip \\
        --output_dir runs/cache/demo --num_augmentations 4

For every item of the split, the teacher embeds K views (view 0 the plain image, views 1..K-1
drawn by ``distill.augment_replay``) and the caption; the class bank's prompts are embedded once.
Items go into chunks of ``chunk_size`` rows, each written atomically, and the manifest is
rewritten after each chunk. A killed build, rerun with the same arguments, keeps the complete
chunks and ends with the same bytes as an uninterrupted build. What is still missing is counted
and handed to ``teacher.plan`` before the first query (a black-box teacher's budget check).

Under ``torchrun`` (or any initialised ``torch.distributed`` group) rank r builds the chunks c
with ``c % world_size == r``; rank 0 embeds the class bank and, after a barrier, completes the
manifest.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

from distill.augment_replay import PARAM_NAMES, ReplayPolicy, apply_params, replay_params
from distill.blackbox import BlackBoxQueryError, BlackBoxTeacher, BudgetExceededError
from distill.run_info import teacher_fingerprint
from distill.teacher_cache import (
    CLASS_BANK,
    FORMAT,
    FORMAT_VERSION,
    ITEMS,
    MANIFEST,
    CacheTeacher,
    ForeignCacheError,
    canonical_json,
    check_fingerprint,
    chunk_name,
    encode_chunk,
    items_bytes,
    read_manifest,
    sha256_hex,
    write_bytes,
    write_manifest,
)
from distill.teachers import Teacher

DEFAULT_POLICY = ReplayPolicy()  # frozen: one shared default is safe
#: A black-box teacher's spend ledger, in the cache folder unless the teacher names its own.
SPEND_LEDGER = "spend.json"


class CacheData(Protocol):
    """What the builder reads from a datamodule (``distill.datamodules.VisionLanguageDataModule``)."""

    classnames: list[str]
    templates: list[str]

    def item_keys(self, split: str) -> list[str]: ...

    def raw_samples_at(self, split: str, indices: Sequence[int]) -> list[dict[str, Any]]: ...


class OnlineTeacher:
    """An open_clip :class:`~distill.teachers.Teacher` behind the :class:`~distill.teacher_cache.CacheTeacher`
    protocol: its own preprocessing and tokenizer, batched on its device, no query budget.

    Args:
        teacher: the frozen teacher (open_clip name + tag, checkpoint, local-dir or config).
        batch_size: images or texts per forward pass.
        device: ``auto`` (``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``) or a torch device.
    """

    def __init__(self, teacher: Teacher, batch_size: int = 256, device: str = "auto") -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if device == "auto":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        self.teacher, self.batch_size, self.device = teacher.to(device), batch_size, torch.device(device)
        self.embed_dim = teacher.embed_dim
        self.logit_scale = float(teacher.logit_scale)
        self._fingerprint: dict[str, Any] | None = None

    def fingerprint(self) -> dict[str, Any]:
        """``distill.run_info.teacher_fingerprint`` of the teacher (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = teacher_fingerprint(self.teacher)
        return self._fingerprint

    def _batched(self, items: list, encode) -> torch.Tensor:
        parts = [encode(items[i : i + self.batch_size]).float().cpu() for i in range(0, len(items), self.batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, self.embed_dim)

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """(N, D) embeddings of raw PIL images, through the teacher's own ``preprocess``."""
        preprocess = self.teacher.preprocess
        return self._batched(
            images, lambda batch: self.teacher.encode_image(torch.stack([preprocess(i) for i in batch]).to(self.device))
        )

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """(M, D) embeddings of texts, through the teacher's own tokenizer."""
        return self._batched(
            texts, lambda batch: self.teacher.encode_text(self.teacher.tokenize(batch).to(self.device))
        )

    def plan(self, num_images: int, num_texts: int) -> None:
        """Nothing to check: an open_clip teacher has no query budget."""


def as_cache_teacher(teacher: Teacher | CacheTeacher) -> CacheTeacher:
    """A protocol teacher as it is; an open_clip ``Teacher`` wrapped in :class:`OnlineTeacher`."""
    if isinstance(teacher, Teacher):
        return OnlineTeacher(teacher)
    if not isinstance(teacher, CacheTeacher):
        raise TypeError(
            f"teacher must be a distill.teachers.Teacher or implement distill.teacher_cache.CacheTeacher "
            f"(embed_dim, logit_scale, fingerprint, encode_images, encode_texts, plan); got {type(teacher).__name__}"
        )
    return teacher


def _distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether this call created the process group): torchrun's env starts one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Barriers only: gloo works with and without GPUs; a long build must not time the barrier out.
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _checked(embeddings: Any, count: int, dim: int, what: str) -> torch.Tensor:
    if not isinstance(embeddings, torch.Tensor) or tuple(embeddings.shape) != (count, dim):
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise ValueError(f"teacher returned {shape} for {what}, expected ({count}, {dim})")
    if not bool(torch.isfinite(embeddings).all()):
        raise ValueError(f"teacher returned non-finite embeddings for {what}")
    return embeddings.to(torch.float32).cpu()


def _recorded_or_valid(folder: Path, entry: dict[str, Any], build_id: str, index: int) -> str | None:
    """SHA-256 of chunk ``index``'s file when it is complete and of this build, else None (rebuild it).

    A file the manifest does not record yet (killed between the chunk and the manifest, or written by
    another rank) counts when its metadata names this build and chunk and it loads.
    """
    path = folder / entry["file"]
    if not path.is_file():
        return None
    data = path.read_bytes()
    sha = sha256_hex(data)
    if entry["sha256"] is not None:
        return sha if sha == entry["sha256"] else None
    try:
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        meta = json.loads(header["__metadata__"]["distill"])
        load_safetensors(data)
    except Exception:  # a damaged file is rebuilt
        return None
    return sha if meta.get("build_id") == build_id and meta.get("chunk") == index else None


def _plan_manifest(
    data: CacheData,
    teacher: CacheTeacher,
    split: str,
    keys: list[str],
    num_augmentations: int,
    policy: ReplayPolicy,
    seed: int,
    chunk_size: int,
    templates: list[str] | None,
) -> dict[str, Any]:
    """The manifest of a fresh build (no chunk done); ``build_id`` hashes everything that decides the bytes."""
    classnames = list(data.classnames)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "teacher": teacher.fingerprint(),
        "embed_dim": int(teacher.embed_dim),
        "logit_scale": float(teacher.logit_scale),
        "num_augmentations": num_augmentations,
        "seed": seed,
        "augmentation": {"policy": policy.to_dict(), "params": list(PARAM_NAMES), "view_0": "the plain image"},
        "items": {"file": ITEMS, "count": len(keys), "sha256": sha256_hex(items_bytes(keys)), "split": split},
        "chunk_size": chunk_size,
        "class_bank": (
            {"file": CLASS_BANK, "classnames": classnames, "templates": list(templates or data.templates)}
            if classnames
            else None
        ),
    }
    manifest["build_id"] = sha256_hex(canonical_json(manifest).encode())
    manifest["chunks"] = [
        {"file": chunk_name(c), "rows": [start, min(len(keys), start + chunk_size)], "sha256": None}
        for c, start in enumerate(range(0, len(keys), chunk_size))
    ]
    if manifest["class_bank"] is not None:
        manifest["class_bank"]["sha256"] = None
    manifest["complete"] = False
    return manifest


def _setting(manifest: dict[str, Any], key: str) -> Any:
    """A build setting of a manifest (the class bank's names and templates, not its progress)."""
    value = manifest.get(key)
    return {k: v for k, v in value.items() if k != "sha256"} if isinstance(value, dict) else value


def _resume_from(folder: Path, manifest: dict[str, Any]) -> None:
    """Copy the recorded hashes of an earlier run of the same build; refuse a folder holding anything else."""
    if (folder / MANIFEST).is_file():
        old = read_manifest(folder)
        if old.get("build_id") != manifest["build_id"]:
            check_fingerprint(folder, old["teacher"], manifest["teacher"])  # another teacher: say which part
            settings = ("items", "num_augmentations", "seed", "augmentation", "chunk_size", "class_bank")
            differ = [k for k in settings if canonical_json(_setting(old, k)) != canonical_json(_setting(manifest, k))]
            raise ForeignCacheError(
                f"{folder} holds a teacher cache built with other settings ({', '.join(differ) or 'format'} differ): "
                "choose another output_dir, or delete it to rebuild"
            )
        for new, previous in zip(manifest["chunks"], old["chunks"]):
            new["sha256"] = previous["sha256"]
        if manifest["class_bank"] is not None:
            manifest["class_bank"]["sha256"] = old["class_bank"]["sha256"]
    elif folder.exists() and any(not p.name.startswith(".") for p in folder.iterdir()):
        raise ValueError(f"output_dir {folder} is not empty and holds no {MANIFEST}: choose an empty or new folder")


def _embed(
    teacher: CacheTeacher, samples: list[dict[str, Any]], keys: list[str], manifest: dict[str, Any], file: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image (n, K, D) and caption (n, D) embeddings of n raw samples, and the (n, K, P) view parameters."""
    count, dim = manifest["num_augmentations"], manifest["embed_dim"]
    policy, seed = ReplayPolicy.from_dict(manifest["augmentation"]["policy"]), manifest["seed"]
    params = np.stack([[replay_params(policy, seed, key, k) for k in range(count)] for key in keys])
    views = [apply_params(sample["image"], p, policy) for sample, ps in zip(samples, params) for p in ps]
    captions = [sample.get("caption") for sample in samples]
    for key, caption in zip(keys, captions):
        if not isinstance(caption, str):
            raise ValueError(f"{manifest['items']['split']} item {key!r} has no caption to embed")
    image = _checked(teacher.encode_images(views), len(views), dim, f"{len(views)} images of {file}")
    text = _checked(teacher.encode_texts(captions), len(keys), dim, f"{len(keys)} captions of {file}")
    return image.view(len(keys), count, dim), text, torch.from_numpy(params)


def _remove_leftovers(folder: Path, names: list[str]) -> None:
    """Temporary files a killed process left beside these files (only their writer removes them)."""
    for name in names:
        for tmp in folder.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def build_teacher_cache(
    data: CacheData,
    teacher: Teacher | CacheTeacher,
    output_dir: str,
    num_augmentations: int = 4,
    policy: ReplayPolicy = DEFAULT_POLICY,
    split: str = "train",
    chunk_size: int = 1024,
    seed: int = 0,
    batch_size: int = 64,
    templates: list[str] | None = None,
    progress: bool = True,
) -> Path:
    """Embed a split with a teacher, K views per item, into a teacher cache folder (resumable).

    Args:
        data: the datamodule whose split is cached (its ``item_keys`` name the items, its class
            names and templates give the class bank).
        teacher: an open_clip ``Teacher`` (wrapped in ``OnlineTeacher``) or any ``CacheTeacher``.
        output_dir: the cache folder: new, empty, or an unfinished build of the same settings.
        num_augmentations: K views per item; view 0 is the plain image.
        policy: how views 1..K-1 are drawn (crop, flip, one TrivialAugment-style op).
        split: the split to cache (training runs read ``train``).
        chunk_size: items per chunk file (the unit of resumption and of work per process).
        seed: seed of the augmentation parameters.
        batch_size: images per teacher call (items per call: ``batch_size // K``, at least 1).
        templates: class bank templates (default: the datamodule's).
        progress: show a progress bar.

    Returns:
        The cache folder.
    """
    if num_augmentations < 1 or chunk_size < 1 or batch_size < 1:
        raise ValueError(
            f"num_augmentations, chunk_size and batch_size must be positive; got {num_augmentations}, "
            f"{chunk_size}, {batch_size}"
        )
    rank, world, created_group = _distributed()
    try:
        teacher = as_cache_teacher(teacher)
        folder = Path(output_dir)
        all_keys = list(data.item_keys(split))
        if not all_keys:
            raise ValueError(f"split {split!r} of {type(data).__name__} has no items to cache")
        first_index: dict[str, int] = {}
        for index, key in enumerate(all_keys):
            first_index.setdefault(key, index)  # equal keys are the same item: one row
        keys = list(first_index)
        manifest = _plan_manifest(data, teacher, split, keys, num_augmentations, policy, seed, chunk_size, templates)
        chunks = manifest["chunks"]
        if rank == 0:
            _resume_from(folder, manifest)
            folder.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(folder, [MANIFEST, ITEMS, CLASS_BANK])
            write_bytes(folder / ITEMS, items_bytes(keys))
            write_manifest(folder, manifest)
        _barrier(world)
        if rank != 0:
            _resume_from(folder, manifest)
        if isinstance(teacher, BlackBoxTeacher) and teacher.ledger is None:
            teacher.attach_ledger(folder / SPEND_LEDGER)  # the spend is kept beside what it paid for
        mine = [c for c in range(len(chunks)) if c % world == rank]
        _remove_leftovers(folder, [chunks[c]["file"] for c in mine])
        todo = []
        for c in mine:
            chunks[c]["sha256"] = _recorded_or_valid(folder, chunks[c], manifest["build_id"], c)
            if chunks[c]["sha256"] is None:
                todo.append(c)
        bank = manifest["class_bank"]
        bank_todo = (
            rank == 0 and bank is not None and _recorded_or_valid(folder, bank, manifest["build_id"], -1) is None
        )
        prompts = [t.format(c) for c in bank["classnames"] for t in bank["templates"]] if bank_todo else []
        rows_todo = sum(chunks[c]["rows"][1] - chunks[c]["rows"][0] for c in todo)
        teacher.plan(rows_todo * num_augmentations, rows_todo + len(prompts))  # before the first query

        per_call = max(1, batch_size // num_augmentations)
        desc = f"teacher cache {folder.name}" + (f" (rank {rank})" if world > 1 else "")
        with tqdm(total=rows_todo, desc=desc, unit="item", disable=not progress or not rows_todo) as bar:
            for c in todo:
                start, stop = chunks[c]["rows"]
                parts = []
                for first in range(start, stop, per_call):
                    rows = range(first, min(stop, first + per_call))
                    wanted = [first_index[keys[r]] for r in rows]
                    samples = data.raw_samples_at(split, wanted)
                    if len(samples) != len(wanted):  # a datamodule that skips bad samples left some out
                        read = {s.get("index") for s in samples}
                        lost = [keys[r] for r, i in zip(rows, wanted) if i not in read]
                        raise ValueError(
                            f"{split} items {lost[:3]} could not be read: a teacher cache needs every item "
                            "(fix or remove them from the data)"
                        )
                    parts.append(_embed(teacher, samples, [keys[r] for r in rows], manifest, chunks[c]["file"]))
                    bar.update(len(rows))
                tensors = (torch.cat([part[i] for part in parts]) for i in range(3))
                blob = encode_chunk(c, manifest["build_id"], torch.arange(start, stop), *tensors)
                write_bytes(folder / chunks[c]["file"], blob)
                chunks[c]["sha256"] = sha256_hex(blob)
                if rank == 0:  # other ranks' chunks are recorded after the barrier
                    write_manifest(folder, manifest)
        if bank_todo:
            dim = int(teacher.embed_dim)
            embedded = _checked(teacher.encode_texts(prompts), len(prompts), dim, "the class bank prompts")
            shape = (len(bank["classnames"]), len(bank["templates"]), dim)
            meta = canonical_json({"format": FORMAT, "build_id": manifest["build_id"], "chunk": -1})
            blob = save_safetensors({"prompts": embedded.view(shape).contiguous()}, metadata={"distill": meta})
            write_bytes(folder / CLASS_BANK, blob)
            bank["sha256"] = sha256_hex(blob)
        _barrier(world)
        if rank == 0:
            for c, chunk in enumerate(chunks):
                chunk["sha256"] = _recorded_or_valid(folder, chunk, manifest["build_id"], c)
                if chunk["sha256"] is None:
                    raise RuntimeError(f"{folder}: {chunk['file']} is missing after the build: rerun to complete it")
            manifest["complete"] = True
            write_manifest(folder, manifest)
            if isinstance(teacher, BlackBoxTeacher):
                print(f"{folder}: {teacher.spend_report()}", file=sys.stderr)
        _barrier(world)
        return folder
    finally:
        if created_group:
            dist.destroy_process_group()


def cache_command(args: list[str] | None = None) -> Path:
    """``distill cache``: :func:`build_teacher_cache` from the command line (``--data``, ``--teacher``...).

    ``--teacher`` is an ``OnlineTeacher`` (``--teacher.teacher.model_name ...``) unless a class is named
    (``--teacher my.BlackBoxTeacher``). A bad option, a foreign or stale folder or a bad teacher output is
    one line on stderr and exit status 2.
    """
    from jsonargparse import ActionConfigFile, ArgumentParser

    from distill.datamodules import VisionLanguageDataModule  # the command's only Lightning import

    parser = ArgumentParser(prog="distill cache", description=build_teacher_cache.__doc__.split("\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of these options")
    parser.add_subclass_arguments(VisionLanguageDataModule, "data", required=True, help="the datamodule to cache")
    parser.add_argument("--teacher", type=OnlineTeacher | CacheTeacher, required=True, help="the teacher")
    parser.add_function_arguments(build_teacher_cache, skip={"data", "teacher"})
    try:
        config = parser.instantiate(parser.parse_args(args))
        return build_teacher_cache(**{k: v for k, v in vars(config).items() if k != "config"})
    except (FileNotFoundError, ValueError, KeyError, TypeError, BudgetExceededError, BlackBoxQueryError) as err:
        print(f"distill cache: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
