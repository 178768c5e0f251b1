"""The validated file index of an ImageNet-layout tree (`train/<class>/...`, optional `val/<class>/...`).

Every file under a class folder is opened and fully decoded once (in parallel), because one corrupt
file is fatal to a DALI pipeline and a truncated JPEG is only caught by decoding its whole body. The
result is cached as JSON, keyed by a fingerprint of the tree (relative paths, sizes, mtimes), so later
runs skip the decode pass; any change to the tree triggers a re-index.

Accounting: every regular file under `train/` and `val/` is either indexed or listed in `report`
with a reason, so `num_indexed + len(report) == files on disk`. A class folder of train/ without a
usable image is dropped from the classes with a warning (labels number the remaining classes in
sorted order); a tree without any class folder is an error.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from PIL import Image, ImageFile

from ...runs.files import write_json, write_text

INDEX_VERSION = 1
SPLITS = ("train", "val")

# Containers that both PIL and DALI's CPU and GPU decoders read, measured with DALI 2.4 on CPU
# (JPEG incl. CMYK/grayscale/progressive, PNG incl. 16-bit/LA/palette, BMP, TIFF, WebP, PNM, JPEG 2000
# all decode; GIF and ICO are fatal). MPO is a JPEG with extra frames.
DALI_FORMATS = {"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"}
IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".jpe", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                    ".pbm", ".pnm", ".jp2", ".j2k", ".gif", ".ico"}


@dataclass
class SplitFiles:
    """One split's good files, in sorted path order. Paths are relative to the tree root."""
    files: List[str] = field(default_factory=list)
    labels: List[int] = field(default_factory=list)
    sizes: List[Tuple[int, int]] = field(default_factory=list)  # (width, height)
    formats: List[str] = field(default_factory=list)
    modes: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)


@dataclass
class FileIndex:
    root: str
    fingerprint: str
    classes: List[str]
    train: SplitFiles
    val: Optional[SplitFiles]
    report: List[Dict[str, str]]  # {"path", "reason"}: every file on disk that is not indexed
    empty_classes: List[str]
    files_on_disk: int
    index_seconds: float = 0.0
    from_cache: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_indexed(self) -> int:
        return len(self.train) + (len(self.val) if self.val is not None else 0)

    def paths(self, split: str = "train") -> List[str]:
        """Absolute paths of one split's files."""
        return [os.path.join(self.root, f) for f in getattr(self, split).files]

    def summary(self) -> str:
        val = f", {len(self.val)} val" if self.val is not None else ""
        source = "cached index" if self.from_cache else f"indexed in {self.index_seconds:.1f} s"
        return (f"{self.root}: {self.num_classes} classes, {len(self.train)} train{val} images ({source}); "
                f"{len(self.report)} of {self.files_on_disk} files excluded")

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in ("root", "fingerprint", "classes", "report", "empty_classes",
                                          "files_on_disk")}
        d["version"] = INDEX_VERSION
        for s in SPLITS:
            part = getattr(self, s)
            d[s] = None if part is None else {k: getattr(part, k) for k in SplitFiles.__dataclass_fields__}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "FileIndex":
        parts = {}
        for s in SPLITS:
            p = d[s]
            parts[s] = None if p is None else SplitFiles(p["files"], p["labels"], [tuple(x) for x in p["sizes"]],
                                                          p["formats"], p["modes"])
        return cls(d["root"], d["fingerprint"], d["classes"], parts["train"], parts["val"], d["report"],
                   d["empty_classes"], d["files_on_disk"], from_cache=True)


def default_cache_path(root: str) -> str:
    """`$XDG_CACHE_HOME/betanas_fast/<name>-<hash of the absolute root>.betanas_index.json`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = os.path.abspath(root)
    key = hashlib.sha1(root.encode()).hexdigest()[:16]
    return os.path.join(base, "betanas_fast", f"{os.path.basename(root) or 'root'}-{key}.betanas_index.json")


def _walk(root: str):
    """Lists the tree: classes (from train/), and every regular file under train/ and val/ with its
    split, class (None when not inside a class folder), size and mtime."""
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        raise FileNotFoundError(f"{root} has no train/ folder; expected the ImageNet layout "
                                f"train/<class>/<image>, optionally val/<class>/<image>")
    classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"{train_dir} has no class folders; expected train/<class>/<image>")
    entries = []  # (relpath, split, class or None, size, mtime_ns)
    for split in SPLITS:
        top = os.path.join(root, split)
        if not os.path.isdir(top):
            continue
        for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root)
            parts = rel_dir.split(os.sep)
            cls = parts[1] if len(parts) > 1 else None
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except OSError:  # a dangling link: counted, reported
                    entries.append((os.path.join(rel_dir, name), split, cls, -1, 0))
                    continue
                entries.append((os.path.join(rel_dir, name), split, cls, st.st_size, st.st_mtime_ns))
    return classes, entries


def _fingerprint(classes, entries) -> str:
    h = hashlib.sha256()
    h.update(("\n".join(classes) + "\0").encode())
    for rel, _, _, size, mtime in entries:
        h.update(f"{rel}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


class UnsupportedFormat(ValueError):
    pass


def check_image(path: str):
    """Fully decodes one file. Returns (format, mode, (w, h)) or raises with the reason."""
    with Image.open(path) as im:
        fmt, mode, size = im.format, im.mode, im.size
        if fmt not in DALI_FORMATS:
            raise UnsupportedFormat(f"format {fmt} is not decodable by DALI")
        # Decoding at 1/8 scale (JPEG DCT scaling) still reads the whole entropy-coded body, so
        # truncation and corruption are caught at a fraction of the cost of a full decode.
        im.draft(mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
        im.load()
    return fmt, mode, size


def _check(entry):
    rel_path, abs_path = entry
    try:
        return check_image(abs_path), None
    except UnsupportedFormat as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001 - any failure to decode excludes the file, with its reason
        ext = os.path.splitext(rel_path)[1].lower()
        if ext not in IMAGE_EXTENSIONS and "cannot identify image file" in str(e):
            return None, "not an image file"
        return None, f"{type(e).__name__}: {e}".replace(abs_path, rel_path)


def build_index(root: str, cache: Optional[str] = None, workers: Optional[int] = None, rebuild: bool = False,
                verbose: bool = True) -> FileIndex:
    """Returns the validated index of the tree at `root`, from `cache` (default `default_cache_path`)
    when the tree's fingerprint still matches, otherwise by decoding every file with `workers` threads
    (default: all cores) and writing the cache atomically. Pass `cache=""` to disable caching."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set, so truncated files cannot be detected")
    root = os.path.abspath(root)
    t0 = time.perf_counter()
    classes, entries = _walk(root)
    fingerprint = _fingerprint(classes, entries)
    cache = default_cache_path(root) if cache is None else cache
    if cache and not rebuild and os.path.exists(cache):
        try:
            with open(cache) as f:
                d = json.load(f)
            if d.get("version") == INDEX_VERSION and d.get("fingerprint") == fingerprint and d.get("root") == root:
                index = FileIndex.from_json(d)
                index.index_seconds = time.perf_counter() - t0
                _announce(index, verbose)
                return index
        except (OSError, ValueError, KeyError) as e:
            warnings.warn(f"ignoring unreadable index cache {cache}: {e}")

    train_classes = set(classes)
    report, todo = [], []
    for rel, split, cls, size, _ in entries:
        if cls is None:
            report.append({"path": rel, "reason": f"not inside a class folder of {split}/"})
        elif cls not in train_classes:  # a val/ folder without a train/ twin, or a hidden folder
            report.append({"path": rel, "reason": f"folder {cls!r} is not a class of train/"})
        elif os.path.basename(rel).startswith("."):
            report.append({"path": rel, "reason": "hidden file"})
        elif size < 0:
            report.append({"path": rel, "reason": "unreadable (dangling link?)"})
        elif size == 0:
            report.append({"path": rel, "reason": "empty file"})
        else:
            todo.append((rel, split, cls))
    workers = workers or os.cpu_count() or 1
    # PIL releases the GIL while decoding, so threads scale without pickling or forking.
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(_check, [(rel, os.path.join(root, rel)) for rel, _, _ in todo], chunksize=64))
    checked = [(t, r) for t, r in zip(todo, results)]
    for (rel, _, _), (info, reason) in checked:
        if info is None:
            report.append({"path": rel, "reason": reason})
    # Classes are the train/ folders holding at least one usable image; empty ones are dropped (with
    # a warning) so that every class can be sampled and balanced.
    populated = {cls for (_, split, cls), (info, _) in checked if info is not None and split == "train"}
    empty = [c for c in classes if c not in populated]
    classes = [c for c in classes if c in populated]
    label_of = {c: i for i, c in enumerate(classes)}
    parts = {"train": SplitFiles(), "val": SplitFiles() if os.path.isdir(os.path.join(root, "val")) else None}
    for (rel, split, cls), (info, _) in checked:
        if info is None:
            continue
        if cls not in label_of:
            report.append({"path": rel, "reason": f"class {cls!r} has no usable image in train/"})
            continue
        part = parts[split]
        fmt, mode, size = info
        part.files.append(rel)
        part.labels.append(label_of[cls])
        part.sizes.append(tuple(size))
        part.formats.append(fmt)
        part.modes.append(mode)
    report.sort(key=lambda r: r["path"])
    index = FileIndex(root, fingerprint, classes, parts["train"], parts["val"], report, empty, len(entries),
                      index_seconds=time.perf_counter() - t0)
    if not classes:
        raise ValueError(f"{root}/train holds no usable image ({len(report)} files excluded: "
                         f"{report[:3]} ...)")
    if cache:
        write_json(cache, index.to_json(), indent=None, newline=False, separators=(",", ":"))
    _announce(index, verbose)
    return index


def _announce(index: FileIndex, verbose: bool) -> None:
    if index.empty_classes:
        warnings.warn(f"{len(index.empty_classes)} class folder(s) of train/ hold no usable image and are left out "
                      f"of the classes: {index.empty_classes[:10]}")
    if verbose:
        print(index.summary())
        for r in index.report[:20]:
            print(f"  excluded {r['path']}: {r['reason']}")
        if len(index.report) > 20:
            print(f"  ... and {len(index.report) - 20} more (FileIndex.report, or write_report())")


def write_report(index: FileIndex, path: str) -> None:
    """Writes the excluded files and their reasons as tab-separated lines."""
    write_text(path, "".join([f"# {index.summary()}\n"] + [f"{r['path']}\t{r['reason']}\n" for r in index.report]))
