"""The on-disk teacher embedding cache: its format, its integrity checks, and reading it.

A cache is a folder that ``distill cache`` (:mod:`distill.cache_builder`) writes:

* ``manifest.json``: format and version, the teacher's fingerprint, ``embed_dim``,
  ``logit_scale``, the number K of augmented views per item, the augmentation policy, seed and
  parameter layout, the items file's SHA-256, the chunk list (rows and SHA-256 of each file) and
  the class bank's entry. Written atomically after every chunk; ``complete`` once all are there.
* ``items.json``: the N item keys, in row order (kept out of the manifest, which is rewritten
  after every chunk).
* ``chunk-00000.safetensors`` ...: ``image`` (n, K, D) float32 teacher image embeddings of the
  K views, ``text`` (n, D) caption embeddings, ``params`` (n, K, P) augmentation parameters
  (``distill.augment_replay.PARAM_NAMES``), ``rows`` (n,) int64 item rows.
* ``classbank.safetensors``: ``prompts`` (C, T, D), the teacher's embedding of every class name
  in every template, so a run needs no teacher for its classifier.

Files hold no timestamps and safetensors metadata is one JSON string: the same build gives the
same bytes. Everything is read with ``json`` and ``safetensors`` only. A foreign cache (another
teacher or data set), a stale one (same teacher, other preprocessing, tokenizer or dtype) and a
corrupt one (a hash mismatch, an unreadable or missing file) each raise an error naming the
folder and the file or component, never a silent fallback.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from distill.augment_replay import PARAM_NAMES, AugmentReplay, ReplayPolicy
from distill.files import atomic_write, atomic_write_text

FORMAT = "distill-teacher-cache"
FORMAT_VERSION = 1
MANIFEST, ITEMS, CLASS_BANK = "manifest.json", "items.json", "classbank.safetensors"
# Components that say *which* teacher it is; any other difference (preprocessing, tokenizer,
# dtype) makes a cache stale rather than foreign.
IDENTITY_KEYS = frozenset({"name", "tag", "pretrained", "weights_sha256", "model_config"})


def chunk_name(index: int) -> str:
    """File name of chunk ``index``."""
    return f"chunk-{index:05d}.safetensors"


def sha256_hex(data: bytes) -> str:
    """SHA-256 of ``data``, hex."""
    return hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> str:
    """Sorted-key, fixed-separator JSON: equal values give equal text (and equal hashes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@runtime_checkable
class CacheTeacher(Protocol):
    """What the cache builder needs from a teacher (an open_clip one, a black box behind an API...).

    Attributes:
        embed_dim: width D of the embeddings.
        logit_scale: the exponentiated temperature of the teacher's logits.
    """

    embed_dim: int
    logit_scale: float

    def fingerprint(self) -> dict[str, Any]:
        """JSON-ready components that decide the embeddings: identity (weights SHA-256, or name + tag),
        ``preprocess``, ``tokenizer``, ``dtype``..."""
        ...

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Raw PIL images -> (N, D) L2-normalised float32 embeddings (the teacher preprocesses itself)."""
        ...

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Texts -> (M, D) L2-normalised float32 embeddings (the teacher tokenizes itself)."""
        ...

    def plan(self, num_images: int, num_texts: int) -> None:
        """Called once before any query with what the build will ask; raises if a budget forbids it."""
        ...


class CacheError(ValueError):
    """A teacher cache that cannot be used as it is."""


class ForeignCacheError(CacheError):
    """The cache describes another teacher or another data set."""


class StaleCacheError(CacheError):
    """Same teacher, but its preprocessing, tokenizer or dtype changed since the build."""


class CorruptCacheError(CacheError):
    """A cache file is missing, unreadable, incomplete or does not match its recorded hash."""


class CacheMissError(CacheError):
    """An item (or class prompt) that the cache does not hold, with no online teacher to embed it."""


_ABSENT = object()  # a component one fingerprint has and the other lacks


def _short(value: Any) -> str:
    text = "absent" if value is _ABSENT else json.dumps(value)
    return text if len(text) <= 70 else text[:67] + "..."


def _leaf_diffs(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted path, old, new)`` of every leaf that differs between two JSON values."""
    if isinstance(old, dict) and isinstance(new, dict):
        diffs = []
        for key in sorted(set(old) | set(new), key=str):
            diffs += _leaf_diffs(old.get(key, _ABSENT), new.get(key, _ABSENT), f"{path}.{key}" if path else str(key))
        return diffs
    return [] if old == new else [(path, old, new)]


def check_fingerprint(folder: str | Path, stored: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise when a cache built under fingerprint ``stored`` does not fit a teacher with ``current``.

    Raises:
        ForeignCacheError: an identity component (name, tag, weights hash, architecture) differs.
        StaleCacheError: only preprocessing, tokenizer, dtype or other processing components differ
            (a dtype change alters the weights hash too: that still counts as stale).
    """
    diffs = _leaf_diffs(stored, current)
    if not diffs:
        return
    changed = sorted({path.split(".")[0] for path, _, _ in diffs})
    details = "; ".join(f"{path}: {_short(old)} -> {_short(new)}" for path, old, new in diffs[:4])
    details += f"; and {len(diffs) - 4} more" if len(diffs) > 4 else ""
    identity = set(changed) & IDENTITY_KEYS
    if identity and not (identity == {"weights_sha256"} and "dtype" in changed):
        raise ForeignCacheError(
            f"{folder}: foreign teacher cache: it was built for another teacher ({', '.join(sorted(identity))} "
            f"differ: {details}); build one for this teacher with `distill cache`"
        )
    raise StaleCacheError(
        f"{folder}: stale teacher cache: the teacher's {', '.join(changed)} changed since it was built "
        f"(cached -> now: {details}); rebuild it with `distill cache`"
    )


# Writing (used by distill.cache_builder) ----------------------------------------------------------
def encode_chunk(
    index: int, build_id: str, rows: torch.Tensor, image: torch.Tensor, text: torch.Tensor, params: torch.Tensor
) -> bytes:
    """The bytes of chunk ``index``: rows (n,), image (n, K, D), text (n, D), params (n, K, P)."""
    tensors = {
        "rows": rows.to(torch.int64).contiguous().cpu(),
        "image": image.to(torch.float32).contiguous().cpu(),
        "text": text.to(torch.float32).contiguous().cpu(),
        "params": params.to(torch.float32).contiguous().cpu(),
    }
    # One metadata key: safetensors writes several in hash-map order, which would change the bytes.
    meta = canonical_json({"format": FORMAT, "version": FORMAT_VERSION, "build_id": build_id, "chunk": index})
    return save_safetensors(tensors, metadata={"distill": meta})


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + rename)."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically (sorted keys: deterministic bytes)."""
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def items_bytes(keys: list[str]) -> bytes:
    """The bytes of ``items.json`` for these keys."""
    return (json.dumps(keys, ensure_ascii=False) + "\n").encode()


# Reading --------------------------------------------------------------------------------------------
def _read(folder: Path, name: str, sha: str | None = None) -> bytes:
    path = folder / name
    if not path.is_file():
        raise CorruptCacheError(f"{folder}: teacher cache file {name} is missing")
    data = path.read_bytes()
    if sha is not None and sha256_hex(data) != sha:
        raise CorruptCacheError(
            f"{folder}: teacher cache file {name} does not match its SHA-256 in {MANIFEST} (corrupt or changed)"
        )
    return data


def _tensors(folder: Path, name: str, data: bytes) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(data)
    except Exception as err:  # any parse failure means the file is not what the build wrote
        raise CorruptCacheError(f"{folder}: teacher cache file {name} is unreadable ({type(err).__name__})") from err


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a cache folder, checked for format and version (not for completeness)."""
    folder = Path(folder)
    try:
        manifest = json.loads(_read(folder, MANIFEST))
    except json.JSONDecodeError as err:
        raise CorruptCacheError(f"{folder}: {MANIFEST} is not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptCacheError(f"{folder}: {MANIFEST} is not a distill teacher cache manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise StaleCacheError(
            f"{folder}: teacher cache format version {manifest.get('version')}, this distill reads "
            f"{FORMAT_VERSION}: rebuild it with `distill cache`"
        )
    return manifest


@dataclass
class CacheTensors:
    """Everything a cache holds per item, in row order.

    Attributes:
        image: (N, K, D) teacher image embeddings of the K views.
        text: (N, D) teacher caption embeddings.
        params: (N, K, P) augmentation parameters of the views.
    """

    image: torch.Tensor
    text: torch.Tensor
    params: torch.Tensor


class TeacherCache:
    """A built teacher cache folder, opened for reading (manifest and item keys checked on opening).

    Args:
        folder: the folder ``distill cache`` wrote.

    Raises:
        FileNotFoundError: no such folder.
        CorruptCacheError: a missing or damaged manifest/items file, or an unfinished build.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"teacher cache folder not found: {self.folder}")
        self.manifest = read_manifest(self.folder)
        if not self.manifest.get("complete"):
            done = sum(chunk["sha256"] is not None for chunk in self.manifest["chunks"])
            raise CorruptCacheError(
                f"{self.folder}: teacher cache is incomplete ({done} of {len(self.manifest['chunks'])} chunks): "
                "its build did not finish; rerun `distill cache` with the same arguments to complete it"
            )
        items = self.manifest["items"]
        self.keys: list[str] = json.loads(_read(self.folder, items["file"], items["sha256"]))
        self._row_of = {key: row for row, key in enumerate(self.keys)}
        self._tensors: CacheTensors | None = None
        self._prompts: torch.Tensor | None = None

    @property
    def fingerprint(self) -> dict[str, Any]:
        """The fingerprint of the teacher the cache was built with."""
        return self.manifest["teacher"]

    @property
    def embed_dim(self) -> int:
        return int(self.manifest["embed_dim"])

    @property
    def logit_scale(self) -> float:
        return float(self.manifest["logit_scale"])

    @property
    def num_augmentations(self) -> int:
        return int(self.manifest["num_augmentations"])

    @property
    def policy(self) -> ReplayPolicy:
        return ReplayPolicy.from_dict(self.manifest["augmentation"]["policy"])

    def check_teacher(self, fingerprint: dict[str, Any]) -> None:
        """Raise a foreign/stale error unless the cache was built by a teacher with this fingerprint."""
        check_fingerprint(self.folder, self.fingerprint, fingerprint)

    def rows_for(self, keys: list[str], what: str = "the training split") -> torch.Tensor:
        """(M,) cache row of each key, -1 for keys the cache lacks.

        Raises:
            ForeignCacheError: none of the keys is in the cache (another data set).
        """
        rows = torch.tensor([self._row_of.get(key, -1) for key in keys], dtype=torch.long)
        if len(keys) and bool((rows < 0).all()):
            raise ForeignCacheError(
                f"{self.folder}: foreign teacher cache: none of the {len(keys)} items of {what} is in it "
                f"(e.g. {keys[0]!r}; the cache holds {len(self.keys)} items such as {self.keys[0]!r}): "
                "it was built for another data set"
            )
        return rows

    def load(self) -> CacheTensors:
        """All chunks, each checked against its SHA-256 (read once, then kept)."""
        if self._tensors is None:
            shapes = (self.num_augmentations, self.embed_dim, len(PARAM_NAMES))
            parts: dict[str, list[torch.Tensor]] = {"image": [], "text": [], "params": []}
            for chunk in self.manifest["chunks"]:
                tensors = _tensors(self.folder, chunk["file"], _read(self.folder, chunk["file"], chunk["sha256"]))
                start, stop = chunk["rows"]
                expected = {
                    "rows": torch.arange(start, stop),
                    "image": (stop - start, shapes[0], shapes[1]),
                    "text": (stop - start, shapes[1]),
                    "params": (stop - start, shapes[0], shapes[2]),
                }
                for name, want in expected.items():
                    got = tensors.get(name)
                    ok = got is not None and (
                        torch.equal(got, want) if name == "rows" else tuple(got.shape) == tuple(want)
                    )
                    if not ok:
                        raise CorruptCacheError(f"{self.folder}: {chunk['file']}: tensor {name!r} is missing or wrong")
                for name in parts:
                    parts[name].append(tensors[name])
            self._tensors = CacheTensors(**{name: torch.cat(values) for name, values in parts.items()})
        return self._tensors

    def replay(self) -> AugmentReplay:
        """The cache's augmentation replay, unbound: ``bind`` it to the stored parameters and the datamodule's items."""
        return AugmentReplay(self.policy, self.num_augmentations, int(self.manifest["seed"]))

    def class_bank(self, classnames: list[str], templates: list[str]) -> torch.Tensor:
        """(C, D) class embeddings from the cached prompt embeddings, as ``distill.zeroshot.build_class_bank``
        computes them (mean of the normalised prompt embeddings, normalised).

        Raises:
            CacheMissError: a class name or template the cache holds no embedding for.
        """
        entry = self.manifest.get("class_bank")
        if entry is None:
            raise CacheMissError(f"{self.folder}: the teacher cache holds no class bank (its data set had no classes)")
        missing_classes = [c for c in classnames if c not in entry["classnames"]]
        missing_templates = [t for t in templates if t not in entry["templates"]]
        if missing_classes or missing_templates:
            raise CacheMissError(
                f"{self.folder}: the teacher cache's class bank lacks class names {missing_classes[:5]} / "
                f"templates {missing_templates[:3]}: give the module a teacher, or rebuild the cache with them"
            )
        if self._prompts is None:
            data = _read(self.folder, entry["file"], entry["sha256"])
            self._prompts = _tensors(self.folder, entry["file"], data).get("prompts")
            want = (len(entry["classnames"]), len(entry["templates"]), self.embed_dim)
            if self._prompts is None or tuple(self._prompts.shape) != want:
                raise CorruptCacheError(f"{self.folder}: {entry['file']}: tensor 'prompts' is missing or not {want}")
        class_index = torch.tensor([entry["classnames"].index(c) for c in classnames])
        template_index = torch.tensor([entry["templates"].index(t) for t in templates])
        bank = self._prompts[class_index][:, template_index].mean(dim=1)
        return bank / bank.norm(dim=1, keepdim=True)
