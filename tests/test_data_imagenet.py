"""The ImageNet data layer: validated index, held-out split, PIL and DALI splits, sharding."""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from betanas_fast.data import SearchData, build_data
from betanas_fast.data import imagenet as inet
from betanas_fast.data.imagenet import split as split_mod

CLASSES = ["n01", "n02", "n03", "n04"]
PER_CLASS = 12


def _photo(rng, h, w):
    """A smooth image (gradients + noise), so that interpolation differences between decoders stay small."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], -1)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def make_tree(root, rng=None, val=True):
    """An ImageNet-layout tree with the real data set's oddities, and a few more. Returns the list of
    files that must be excluded, with a word of the expected reason."""
    rng = rng or np.random.default_rng(0)
    for c in CLASSES:
        os.makedirs(os.path.join(root, "train", c))
        for i in range(PER_CLASS):
            h, w = int(rng.integers(40, 72)), int(rng.integers(40, 72))
            Image.fromarray(_photo(rng, h, w)).save(os.path.join(root, "train", c, f"{c}_{i}.JPEG"), quality=90)
        if val:
            os.makedirs(os.path.join(root, "val", c))
            for i in range(2):
                Image.fromarray(_photo(rng, 50, 60)).save(os.path.join(root, "val", c, f"val_{c}_{i}.JPEG"))
    t = os.path.join(root, "train")
    img = Image.fromarray(_photo(rng, 48, 64))
    img.convert("CMYK").save(f"{t}/n01/cmyk.JPEG")
    img.convert("L").save(f"{t}/n02/gray.JPEG")
    img.save(f"{t}/n03/png_named.JPEG", format="PNG")
    img.save(f"{t}/n04/upper.JPG")
    img.save(f"{t}/n04/lower.jpeg")
    good = open(f"{t}/n01/n01_0.JPEG", "rb").read()
    open(f"{t}/n02/truncated.JPEG", "wb").write(good[: len(good) // 2])
    open(f"{t}/n03/readme.txt", "w").write("not an image")
    open(f"{t}/n03/garbage.JPEG", "wb").write(b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 255, 300, dtype=np.uint8)))
    img.save(f"{t}/n04/anim.gif")
    open(f"{t}/n04/empty.JPEG", "wb").close()
    open(f"{t}/stray.JPEG", "wb").write(good)
    os.makedirs(f"{t}/n05_empty")
    return {"n02/truncated.JPEG": "truncated", "n03/readme.txt": "not an image", "n03/garbage.JPEG": "",
            "n04/anim.gif": "GIF", "n04/empty.JPEG": "empty", "stray.JPEG": "class folder"}


def files_on_disk(root):
    return sum(len(f) for split in ("train", "val") for _, _, f in os.walk(os.path.join(root, split)))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("imagenet"))
    bad = make_tree(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = inet.build_index(root, cache=os.path.join(root, "..", "index.json"), verbose=False)
    return root, bad, index


# ---------------------------------------------------------------- index

def test_index_contents(tree):
    root, _, index = tree
    assert index.classes == CLASSES  # the empty class folder is dropped
    assert index.empty_classes == ["n05_empty"]
    counts = np.bincount(index.train.labels)
    assert counts.tolist() == [PER_CLASS + 1, PER_CLASS + 1, PER_CLASS + 1, PER_CLASS + 2]
    assert len(index.val) == 2 * len(CLASSES)
    kinds = dict(zip(index.train.files, zip(index.train.formats, index.train.modes)))
    assert kinds[os.path.join("train", "n01", "cmyk.JPEG")] == ("JPEG", "CMYK")
    assert kinds[os.path.join("train", "n02", "gray.JPEG")] == ("JPEG", "L")
    assert kinds[os.path.join("train", "n03", "png_named.JPEG")][0] == "PNG"
    assert os.path.join("train", "n04", "upper.JPG") in kinds and os.path.join("train", "n04", "lower.jpeg") in kinds
    w, h = index.train.sizes[index.train.files.index(os.path.join("train", "n01", "cmyk.JPEG"))]
    assert (w, h) == (64, 48)
    for rel, label in zip(index.train.files, index.train.labels):
        assert rel.split(os.sep)[1] == CLASSES[label]


def test_bad_file_report_accounts_for_every_file(tree):
    root, bad, index = tree
    reported = {os.path.relpath(r["path"], "train"): r["reason"] for r in index.report}
    assert set(reported) == set(bad)
    for path, word in bad.items():
        assert word in reported[path], (path, reported[path])
    assert index.num_indexed + len(index.report) == files_on_disk(root) == index.files_on_disk
    assert f"{len(index.report)} of {index.files_on_disk} files excluded" in index.summary()


def test_report_file_and_notice(tree, tmp_path, capsys):
    root, bad, index = tree
    inet.write_report(index, str(tmp_path / "bad.tsv"))
    lines = (tmp_path / "bad.tsv").read_text().splitlines()
    assert len(lines) == 1 + len(bad)
    with pytest.warns(UserWarning, match="n05_empty"):
        inet.build_index(root, cache=os.path.join(root, "..", "index.json"))
    out = capsys.readouterr().out
    assert "cached index" in out and "excluded train/n02/truncated.JPEG" in out


def test_index_cache_reuse_and_reindex(tmp_path):
    root = str(tmp_path / "tree")
    make_tree(root, val=False)
    cache = str(tmp_path / "cache" / "idx.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = inet.build_index(root, cache=cache, verbose=False)
        assert not first.from_cache and os.path.exists(cache)
        again = inet.build_index(root, cache=cache, verbose=False)
        assert again.from_cache and again.to_json() == first.to_json()
        assert again.val is None
        # A new file changes the fingerprint: re-indexed, and the file is in.
        Image.fromarray(_photo(np.random.default_rng(1), 40, 40)).save(os.path.join(root, "train", "n01", "new.JPEG"))
        changed = inet.build_index(root, cache=cache, verbose=False)
        assert not changed.from_cache and changed.fingerprint != first.fingerprint
        assert os.path.join("train", "n01", "new.JPEG") in changed.train.files
        # A file rewritten in place (same name, new content) is caught by size/mtime.
        target = os.path.join(root, "train", "n01", "n01_1.JPEG")
        open(target, "wb").write(open(target, "rb").read()[:200])
        os.utime(target, ns=(1, 1))
        rewritten = inet.build_index(root, cache=cache, verbose=False)
        assert not rewritten.from_cache
        assert os.path.join("train", "n01", "n01_1.JPEG") in {r["path"] for r in rewritten.report}
        assert inet.build_index(root, cache=cache, verbose=False).from_cache
        assert not inet.build_index(root, cache=cache, verbose=False, rebuild=True).from_cache


def test_default_cache_location(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = inet.default_cache_path("/data/imagenet")
    assert path.startswith(str(tmp_path / "xdg" / "betanas_fast")) and path.endswith(".betanas_index.json")
    assert path != inet.default_cache_path("/other/imagenet")


def test_index_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train/"):
        inet.build_index(str(tmp_path), cache="")
    os.makedirs(tmp_path / "train")
    with pytest.raises(ValueError, match="no class folders"):
        inet.build_index(str(tmp_path), cache="")
    os.makedirs(tmp_path / "train" / "a")
    open(tmp_path / "train" / "a" / "x.txt", "w").write("text")
    with pytest.raises(ValueError, match="no usable image"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inet.build_index(str(tmp_path), cache="", verbose=False)


# ---------------------------------------------------------------- held-out split

def test_split_balanced_disjoint_deterministic(tree):
    _, _, index = tree
    s = inet.make_split(index, heldout_per_class=3, val_per_class=2, seed=5)
    labels = np.asarray(index.train.labels)
    assert np.bincount(labels[s.heldout]).tolist() == [3] * 4
    assert np.bincount(labels[s.val]).tolist() == [2] * 4
    assert not set(s.heldout) & set(s.train) and not set(s.val) & set(s.train) and not set(s.heldout) & set(s.val)
    assert sorted(s.train + s.heldout + s.val) == list(range(len(index.train)))
    assert inet.make_split(index, 3, 2, seed=5) == s
    assert inet.make_split(index, 3, 2, seed=6).heldout != s.heldout
    assert inet.per_class_count(index, fraction=0.1) == round(0.1 * len(index.train) / 4)
    assert inet.per_class_count(index, per_class=7) == 7


def test_split_errors(tree):
    _, _, index = tree
    with pytest.raises(ValueError, match="too few images"):
        inet.make_split(index, heldout_per_class=PER_CLASS + 1)
    with pytest.raises(ValueError, match="leaving nothing"):
        inet.make_split(index, heldout_per_class=10, val_per_class=10)
    with pytest.raises(ValueError, match="exactly one"):
        inet.per_class_count(index)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        inet.per_class_count(index, fraction=1.5)


def test_split_saved_and_reused_on_resume(tree, tmp_path):
    _, _, index = tree
    s = inet.load_or_make_split(index, str(tmp_path), 3, 0, seed=1)
    path = tmp_path / split_mod.SPLIT_FILE
    assert path.exists()
    assert inet.load_or_make_split(index, str(tmp_path), 3, 0, seed=1) == s
    with pytest.raises(ValueError, match="same settings"):
        inet.load_or_make_split(index, str(tmp_path), 4, 0, seed=1)
    with pytest.raises(ValueError, match="same settings"):
        inet.load_or_make_split(index, str(tmp_path), 3, 0, seed=2)


def test_split_verified_against_changed_tree(tmp_path):
    root = str(tmp_path / "tree")
    make_tree(root, val=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = inet.build_index(root, cache="", verbose=False)
        s = inet.load_or_make_split(index, str(tmp_path), 2, 0, seed=0)
        held_files = {index.train.files[i] for i in s.heldout}
        # A new image: the saved held-out files are kept, the new image trains the weights.
        Image.fromarray(_photo(np.random.default_rng(2), 40, 40)).save(os.path.join(root, "train", "n01", "a_new.JPEG"))
        grown = inet.build_index(root, cache="", verbose=False)
        with pytest.warns(UserWarning, match="tree changed"):
            r = inet.load_or_make_split(grown, str(tmp_path), 2, 0, seed=0)
        assert {grown.train.files[i] for i in r.heldout} == held_files
        assert grown.train.files.index(os.path.join("train", "n01", "a_new.JPEG")) in r.train
        assert sorted(r.train + r.heldout) == list(range(len(grown.train)))
        # A held-out image removed: the run cannot resume faithfully.
        os.remove(os.path.join(root, sorted(held_files)[0]))
        shrunk = inet.build_index(root, cache="", verbose=False)
    with pytest.raises(ValueError, match="no longer in the index"):
        inet.load_or_make_split(shrunk, str(tmp_path), 2, 0, seed=0)


# ---------------------------------------------------------------- loaders

def test_folder_split_batches(tree):
    _, _, index = tree
    split = inet.FolderSplit(index, range(len(index.train)), 32)
    idx = torch.tensor([0, 5, len(split) - 1])
    x, y = split.batch(idx, train=True, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
    assert torch.equal(y, torch.tensor(index.train.labels)[idx])
    x2, _ = split.batch(idx, train=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)  # augmentation comes from the generator only
    x3, _ = split.batch(idx, train=True, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(x, x3)
    e1, _ = split.batch(idx, train=False, generator=torch.Generator().manual_seed(0))
    e2, _ = split.batch(idx, train=False, generator=torch.Generator().manual_seed(1))
    assert torch.equal(e1, e2)  # evaluation is not augmented
    assert abs(float(e1.mean())) < 3 and 0.1 < float(e1.std()) < 3  # normalised
    cl = inet.FolderSplit(index, range(len(index.train)), 32, channels_last=True)
    xc, _ = cl.batch(idx, train=False)
    assert xc.shape == (3, 3, 32, 32) and xc.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(xc, e1)


def split_class(kind):
    """The random-access split of `kind`; the DALI one only where DALI is installed."""
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
        from betanas_fast.data.imagenet.dali import DaliSplit
        return DaliSplit
    return inet.FolderSplit


@pytest.mark.parametrize("kind", ["folder", "dali"])
def test_scoring_shards_read_every_image_once(tree, kind):
    """Scoring reads a split batch by batch in order, each rank taking every world-th image of a batch,
    the last batch partially filled: over the ranks every image once, as decoding the whole split gives it."""
    _, _, index = tree
    split = split_class(kind)(index, range(len(index.val)), 32, "val", False)
    whole, labels = split.batch(torch.arange(len(split)), train=False)
    assert labels.tolist() == index.val.labels
    world, seen = 2, []
    for start in range(0, len(split), 3):  # 8 images: batches of 3, 3 and 2
        idx = torch.arange(start, min(start + 3, len(split)))
        for rank in range(world):
            part = idx[rank::world]
            x, y = split.batch(part, train=False)
            assert x.shape == (len(part), 3, 32, 32)
            assert torch.equal(y, labels[part]) and torch.allclose(x, whole[part], atol=1e-5)
            seen += part.tolist()
    assert sorted(seen) == list(range(len(split)))


@pytest.mark.parametrize("n", [47, 48])
@pytest.mark.parametrize("kind", ["folder", "dali"])
def test_sharded_streams_split_every_global_batch(tree, kind, n):
    """Under torchrun every rank streams the same global batches (one BatchOrder seed) and decodes its
    contiguous share: equal shares (the ranks stay in step), together the global batch, every image at most
    once per epoch (exactly once when the batches tile the split), in a new order each epoch."""
    from betanas_fast.data import BatchOrder
    from betanas_fast.data.stream import BatchStream
    from betanas_fast.runs.ranks import Ranks
    _, _, index = tree
    world, batch = 2, 8
    # each rank (a process of its own) has its own split: one DALI pipeline must not serve two prefetch threads
    splits = [split_class(kind)(index, range(n), 32, "train", False) for _ in range(world)]
    whole, labels = splits[0].batch(torch.arange(n), train=False)
    reference = BatchOrder(n, batch, seed=3)
    streams = [BatchStream(splits[r], BatchOrder(n, batch, seed=3), train=False,
                           shard=Ranks(rank=r, world=world).shard) for r in range(world)]
    epochs = []
    try:
        for _ in range(2):
            epoch = []
            for _ in range(reference.batches_per_epoch):
                idx = reference.next_indices()
                parts = [stream.next() for stream in streams]
                assert [len(y) for _, y in parts] == [batch // world] * world
                x, y = torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])
                assert torch.equal(y, labels[idx]) and torch.allclose(x, whole[idx], atol=1e-5)
                epoch += idx.tolist()
            assert len(set(epoch)) == len(epoch) == (n // batch) * batch
            if n % batch == 0:
                assert sorted(epoch) == list(range(n))
            epochs.append(epoch)
    finally:
        for stream in streams:
            stream.close()
    assert epochs[0] != sorted(epochs[0]) and epochs[0] != epochs[1]


def test_auto_loader_falls_back_with_notice(monkeypatch, capsys):
    monkeypatch.setattr(inet, "dali_available", lambda: False)
    assert inet.resolve_loader("auto") == "folder"
    assert "DALI is not installed" in capsys.readouterr().out
    with pytest.raises(ImportError, match="pip install"):
        inet.resolve_loader("dali")
    with pytest.raises(ValueError, match="unknown loader"):
        inet.resolve_loader("torchvision2")


def test_import_does_not_import_dali():
    code = ("import sys, betanas_fast, betanas_fast.data, betanas_fast.data.imagenet; "
            "print(any(m.startswith('nvidia.dali') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_load_imagenet_data_folder(tree, tmp_path):
    root, _, index = tree
    data = build_data("imagenet", seed=0, heldout=8, val=0, resolution=32, augment=True, root=root,
                      run_dir=str(tmp_path), index=index, loader="folder")
    assert isinstance(data, SearchData) and data.num_classes == 4 and data.resolution == 32
    assert np.bincount(data.heldout.labels.numpy()).tolist() == [2] * 4
    assert len(data.val) == len(index.val)  # val/ is used when the tree has one
    assert len(data.train) + len(data.heldout) == len(index.train)
    assert set(data.train.paths).isdisjoint(data.heldout.paths)
    assert (tmp_path / split_mod.SPLIT_FILE).exists()
    again = inet.load_imagenet_data(seed=0, heldout=8, root=root, run_dir=str(tmp_path), index=index,
                                    loader="folder", resolution=32)
    assert again.heldout.paths == data.heldout.paths
    x, y = data.train.batch(torch.arange(4), True, torch.Generator().manual_seed(0))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.long
    # Without val/, a balanced validation split is carved from train/.
    no_val = inet.load_imagenet_data(seed=0, heldout_per_class=2, val=8, root=root, index=_without_val(index),
                                     loader="folder", resolution=32)
    assert np.bincount(no_val.val.labels.numpy()).tolist() == [2] * 4
    assert set(no_val.val.paths).isdisjoint(no_val.train.paths + no_val.heldout.paths)


def _without_val(index):
    import dataclasses
    return dataclasses.replace(index, val=None)


# ---------------------------------------------------------------- DALI

def test_dali_split_matches_folder_split(tree):
    pytest.importorskip("nvidia.dali")
    from betanas_fast.data.imagenet.dali import DaliSplit
    _, _, index = tree
    positions = range(len(index.train))
    pil = inet.FolderSplit(index, positions, 32)
    dali = DaliSplit(index, positions, 32)
    assert torch.equal(pil.labels, dali.labels) and len(pil) == len(dali)
    # All of CMYK, grayscale and the PNG named .JPEG go through DALI's decoder.
    odd = [index.train.files.index(os.path.join("train", *p)) for p in
           (("n01", "cmyk.JPEG"), ("n02", "gray.JPEG"), ("n03", "png_named.JPEG"), ("n04", "upper.JPG"))]
    for train, idx in ((False, torch.tensor(odd)), (True, torch.arange(0, len(pil), 3))):
        xp, yp = pil.batch(idx, train, torch.Generator().manual_seed(4))
        xd, yd = dali.batch(idx, train, torch.Generator().manual_seed(4))
        assert xd.shape == xp.shape and torch.equal(yd, yp)
        # Same windows and flips; only the two libraries' interpolation differs.
        assert float((xd - xp).abs().mean()) < 0.05, train
    # A smaller batch than before reuses the pipeline (variable batch size).
    xd, _ = dali.batch(torch.tensor([1, 2]), False)
    xp, _ = pil.batch(torch.tensor([1, 2]), False)
    assert xd.shape == (2, 3, 32, 32) and float((xd - xp).abs().mean()) < 0.05


def test_dali_stream_matches_folder_stream(tree):
    """The search's input under either loader: the same batches and labels and, from the same augmentation
    generator, the same windows and flips, so the same pixels up to the two libraries' interpolation."""
    pytest.importorskip("nvidia.dali")
    from betanas_fast.data import BatchOrder
    from betanas_fast.data.imagenet.dali import DaliSplit
    from betanas_fast.data.stream import BatchStream
    _, _, index = tree
    for part, positions, train in (("val", range(len(index.val)), False), ("train", range(len(index.train)), True)):
        streams = [BatchStream(Split(index, positions, 32, part, train), BatchOrder(len(positions), 6, seed=0),
                               train=train, generator=torch.Generator().manual_seed(0))
                   for Split in (inet.FolderSplit, DaliSplit)]
        try:
            for _ in range(3):  # crosses an epoch of val/
                (xp, yp), (xd, yd) = (stream.next() for stream in streams)
                assert xd.shape == xp.shape == (6, 3, 32, 32) and torch.equal(yd, yp)
                assert float((xd - xp).abs().mean()) < 0.05, part
        finally:
            for stream in streams:
                stream.close()


def test_dali_split_deterministic_and_channels_last(tree):
    pytest.importorskip("nvidia.dali")
    from betanas_fast.data.imagenet.dali import DaliSplit
    _, _, index = tree
    positions, idx = range(len(index.train)), torch.arange(0, len(index.train), 5)

    def batch(seed, **kw):
        return DaliSplit(index, positions, 32, **kw).batch(idx, True, torch.Generator().manual_seed(seed))

    (xa, ya), (xb, yb) = batch(7), batch(7)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)  # augmentation comes from the generator only
    assert not torch.equal(xa, batch(8)[0])
    xc, _ = batch(7, channels_last=True)
    assert xc.shape == (len(idx), 3, 32, 32) and xc.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(xc, xa)


def test_load_imagenet_data_dali(tree, tmp_path):
    pytest.importorskip("nvidia.dali")
    root, _, index = tree
    data = inet.load_imagenet_data(seed=0, heldout_per_class=2, root=root, run_dir=str(tmp_path), index=index,
                                   loader="dali", device="cpu", resolution=32)
    x, y = data.heldout.batch(torch.arange(len(data.heldout)), False)
    assert x.shape == (8, 3, 32, 32) and np.bincount(y.numpy()).tolist() == [2] * 4


@pytest.mark.parametrize("kind", ["folder", "dali"])
def test_engine_interface_batch_order_resume(tree, tmp_path, kind):
    """The engine drives a split with BatchOrder and its own augmentation generator; restoring both
    from a checkpoint must reproduce the same batches, pixels included."""
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
    from betanas_fast.data import BatchOrder
    root, _, index = tree
    data = inet.load_imagenet_data(seed=0, heldout_per_class=2, root=root, index=index, loader=kind, device="cpu",
                                   resolution=32)
    order, gen = BatchOrder(len(data.train), 8, seed=1), torch.Generator().manual_seed(2)
    for _ in range(3):
        data.train.batch(order.next_indices(), True, gen)
    saved = (order.state_dict(), gen.get_state())
    ahead = [data.train.batch(order.next_indices(), True, gen) for _ in range(5)]  # crosses an epoch
    order2, gen2 = BatchOrder(len(data.train), 8, seed=1), torch.Generator()
    order2.load_state_dict(saved[0])
    gen2.set_state(saved[1])
    for x, y in ahead:
        x2, y2 = data.train.batch(order2.next_indices(), True, gen2)
        assert torch.equal(y, y2) and torch.equal(x, x2)
    x, y = data.heldout.batch(torch.arange(len(data.heldout)), train=False)
    assert x.shape == (8, 3, 32, 32) and y.dtype == torch.long and data.num_classes == 4
