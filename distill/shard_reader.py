"""Reading a shard folder written by ``distill.shards``: samples by split and index, decoded and checked.

Every problem with a sample is a :class:`BadSampleError` naming the shard file and the sample key.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

from PIL import Image
from webdataset.tariterators import base_plus_ext

from distill.shards import IMAGE_EXTS, ShardsMeta, Unlabelled


class BadSampleError(ValueError):
    """A sample of a shard (``shard`` file, ``key``) cannot be used: no image, an image that does not decode..."""

    def __init__(self, message: str, shard: Path | None = None, key: str | None = None) -> None:
        super().__init__(message)  # one positional argument: DataLoader workers re-raise it by type
        self.shard, self.key = shard, key


# Reading ------------------------------------------------------------------------------------------
class ShardReader:
    """Samples of a shard folder by split and index: decoded, checked, with label and domain indices.

    A shard is opened (its member list read: tar headers only) on first use; the last few stay
    open, in the process that opened them (a DataLoader worker opens its own).

    Args:
        root: the shard folder.
        meta: its ``dataset.json``.
        unlabelled_samples: a sample without a class while ``dataset.json`` lists classes is an
            ``error``, or kept with label -1 (``retrieval_only``). Without classes every label is -1.
    """

    keep_open = 8

    def __init__(self, root: str | Path, meta: ShardsMeta, unlabelled_samples: Unlabelled = "error") -> None:
        self.root, self.meta, self.unlabelled_samples = Path(root), meta, unlabelled_samples
        self._label = {name: i for i, name in enumerate(meta.classnames)}
        self._domain = {name: i for i, name in enumerate(meta.domain_names)}
        self._open: OrderedDict[Path, tuple[tarfile.TarFile, dict]] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": OrderedDict()}  # open files stay with their process

    def _members(self, path: Path) -> tuple[tarfile.TarFile, dict[str, dict[str, tarfile.TarInfo]]]:
        if self._pid != os.getpid():  # a forked worker: never share the parent's file offsets
            self._open, self._pid = OrderedDict(), os.getpid()
        if path not in self._open:
            try:
                tar = tarfile.open(path, "r:")  # noqa: SIM115  (kept open across reads; closed when evicted)
                members: dict[str, dict[str, tarfile.TarInfo]] = {}
                for info in tar.getmembers():
                    key, ext = base_plus_ext(info.name)  # webdataset's rule: the key ends at the first dot
                    if info.isreg() and key is not None:
                        members.setdefault(key, {})[ext.lower()] = info
            except (OSError, tarfile.TarError) as err:
                raise ValueError(f"{path}: not a readable tar shard ({type(err).__name__}: {err})") from err
            self._open[path] = (tar, members)
            while len(self._open) > self.keep_open:
                self._open.popitem(last=False)[1][0].close()
        self._open.move_to_end(path)
        return self._open[path]

    def read(self, split: str, index: int) -> dict[str, Any]:
        """Sample ``index`` of ``split``: ``{"image": PIL RGB, "caption", "label", "domain", "index", "key"}``.

        Raises:
            BadSampleError: no image, an image that does not decode, no caption (missing or empty
                ``.txt``), a class or domain not in ``dataset.json``, or no such sample in its shard.
        """
        record = self.meta.splits[split]
        if not 0 <= index < len(record.keys):
            raise IndexError(f"index {index} out of range for split {split!r} of {len(record.keys)} samples")
        path, key = self.root / record.shards[record.shard_of(index)], record.keys[index]
        tar, members = self._members(path)
        files = members.get(key, {})

        def bad(reason: str) -> BadSampleError:
            return BadSampleError(f"{path}: sample {key!r}: {reason}", path, key)

        ext = next((e for e in IMAGE_EXTS if e in files), None)
        if ext is None:
            raise bad(f"no image file (.{', .'.join(IMAGE_EXTS)})" if files else "not in the shard, yet listed there")
        try:
            data = {name: tar.extractfile(info).read() for name, info in files.items()}
            with Image.open(io.BytesIO(data[ext])) as image:
                rgb = image.convert("RGB")
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for broken images
            raise bad(f"its .{ext} image cannot be read or does not decode ({type(err).__name__}: {err})") from err
        try:
            caption, info = data.get("txt", b"").decode("utf-8"), json.loads(data.get("json", b"{}"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise bad(f"unreadable .txt or .json ({err})") from err
        if not caption.strip():
            raise bad("no caption (missing or empty .txt)")
        if not isinstance(info, dict):
            raise bad(f".json must hold an object, got {info!r}")
        name, domain = info.get("class"), info.get("domain") or "default"
        if name and name not in self._label:
            raise bad(f"class {name!r} is not in the class list of dataset.json")
        if not name and self._label and self.unlabelled_samples == "error":
            raise bad("no class, though dataset.json lists classes (see unlabelled_samples)")
        if domain not in self._domain:
            raise bad(f"domain {domain!r} is not in the domain list of dataset.json")
        label = self._label[name] if name else -1
        return dict(image=rgb, caption=caption, label=label, domain=self._domain[domain], index=index, key=key)
