"""Ingest (Ray Data) -> Parquet shards -> batches, on tiny trees built here and on the demo data."""
from __future__ import annotations

import importlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from datasets_io.demo import make_demo
from datasets_io.layouts import read_dataset
from datasets_io.records import COLUMNS, SPLITS, VA_SCALE
from datasets_io.ray_data import load_split
from datasets_io.prep import ImagePrep, ImageTransform
from datasets_io.shards import iter_local_batches, numpy_batch, to_tensors
from test_images import bad_files, encode, noise

ingest_module = importlib.import_module("datasets_io.ingest")
ingest = ingest_module.ingest
SHARD_SCHEMA = ingest_module.SHARD_SCHEMA
REPO = Path(__file__).resolve().parents[1]

EMOTION6_HEADER = "[image_filename]\t[valence]\t[arousal]\t" + "\t".join(
    f"[prob. {e}]" for e in ("anger", "disgust", "fear", "joy", "sadness", "surprise", "neutral"))


def _emotion6_row(path: str, valence: float, arousal: float, peak: int) -> str:
    probs = [0.1] * 7
    probs[peak] = 0.4
    return "\t".join([path, str(valence), str(arousal)] + [str(p) for p in probs])


@pytest.fixture(scope="module")
def bad_tree(tmp_path_factory) -> Path:
    """An Emotion6-layout tree: 4 good images in awkward modes + every kind of bad entry."""
    root = tmp_path_factory.mktemp("bad_tree")
    images = root / "images"
    (images / "joy").mkdir(parents=True)
    (images / "fear").mkdir()
    good = {
        "joy/rgb.jpg": encode(noise(90, 60, seed=1), "JPEG"),
        "joy/rgba.png": encode(Image.new("RGBA", (40, 40), (0, 0, 0, 0)), "PNG"),
        "fear/cmyk.jpg": encode(Image.new("CMYK", (30, 50), (0, 255, 0, 0)), "JPEG"),
        "fear/gray16.png": encode(Image.fromarray(np.full((20, 20), 30000, np.uint16)), "PNG"),
    }
    bad = {f"fear/{name}": data for name, (data, _) in bad_files().items()}
    for rel, data in {**good, **bad}.items():
        (images / rel).write_bytes(data)
    (root / "outside.jpg").write_bytes(good["joy/rgb.jpg"])  # real file, but only reachable via ../
    rows = [_emotion6_row(rel, 2 + i, 8 - i, 3 if rel.startswith("joy") else 2) for i, rel in enumerate(good)]
    rows += [_emotion6_row(rel, 5, 5, 2) for rel in bad]
    rows += [_emotion6_row("fear/missing.jpg", 5, 5, 2),
             _emotion6_row("../outside.jpg", 5, 5, 2),
             _emotion6_row(str(root / "outside.jpg"), 5, 5, 2)]
    (root / "ground_truth.txt").write_text("\n".join([EMOTION6_HEADER] + rows) + "\n")
    return root


@pytest.fixture(scope="module")
def bad_out(ray_session, bad_tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad_out") / "shards"
    ingest("emotion6", bad_tree, out, reader_options={"split_ratios": [1.0, 0.0, 0.0]}, show_progress=False)
    return out


def _rows(out: Path, split: str) -> list[dict]:
    return pq.read_table(out / split).to_pylist()


def test_bad_inputs_are_skipped_with_reasons(bad_out):
    manifest = json.loads((bad_out / "manifest.json").read_text())
    reasons = {item["path"]: item["reason"].split(":")[0] for item in manifest["skipped"]}
    expected_bad = {f"images/fear/{name}": reason for name, (_, reason) in bad_files().items()}
    assert manifest["num_skipped"] == len(manifest["skipped"]) == 8
    assert {path: reasons[path] for path in expected_bad} == expected_bad
    assert reasons["images/fear/missing.jpg"] == "missing on disk"
    escaping = [path for path, reason in reasons.items() if reason == "path escapes dataset root"]
    assert len(escaping) == 2 and any(".." in path for path in escaping)


def test_good_rows_have_labels_va_and_rgb_jpegs(bad_out):
    rows = {row["image_id"]: row for row in _rows(bad_out, "train")}
    assert sorted(rows) == ["images/fear/cmyk.jpg", "images/fear/gray16.png", "images/joy/rgb.jpg",
                            "images/joy/rgba.png"]
    for i, image_id in enumerate(["images/joy/rgb.jpg", "images/joy/rgba.png", "images/fear/cmyk.jpg",
                                  "images/fear/gray16.png"]):
        row = rows[image_id]
        assert row["label"] == (3 if "joy" in image_id else 2)
        assert row["valence"] == pytest.approx((2 + i - 5) / 4) and row["arousal"] == pytest.approx((8 - i - 5) / 4)
        assert row["va_source"] == "measured" and row["split"] == "train"
        assert sum(row["label_dist"]) == pytest.approx(1.0, abs=1e-5)
        with Image.open(io.BytesIO(row["image"])) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
    assert np.asarray(Image.open(io.BytesIO(rows["images/joy/rgba.png"]["image"]))).min() > 245


def test_schema_layout_and_manifest(bad_out):
    manifest = json.loads((bad_out / "manifest.json").read_text())
    assert manifest["columns"] == list(COLUMNS) and manifest["va_scale"] == VA_SCALE
    assert manifest["counts"] == {"train": 4, "val": 0, "test": 0}
    assert manifest["layout"] == "emotion6" and Path(manifest["root"]).is_absolute()
    assert manifest["params"]["max_side"] == 512 and manifest["params"]["reader_options"]["split_ratios"] == [1, 0, 0]
    for split in SPLITS:  # every split has a folder, and every file carries the full schema
        files = sorted((bad_out / split).glob("*.parquet"))
        assert files, split
        for file in files:
            assert pq.read_schema(file).remove_metadata().equals(SHARD_SCHEMA)
    assert sum(pq.read_metadata(f).num_rows for f in (bad_out / "val").glob("*.parquet")) == 0
    assert not list(bad_out.parent.glob("*.tmp-*"))


def test_empty_split_loads_as_empty_dataset(bad_out):
    assert load_split(bad_out, "val").count() == 0
    assert load_split(bad_out, "train", columns=["image_id", "label"]).columns() == ["image_id", "label"]


def test_second_run_is_a_no_op_and_overwrite_replaces(bad_tree, bad_out, capsys):
    before = {p: p.stat().st_mtime_ns for p in bad_out.rglob("*")}
    manifest = ingest("emotion6", bad_tree, bad_out, show_progress=False)
    assert capsys.readouterr().out.strip() == f"already ingested: {bad_out} (use --overwrite)"
    assert manifest == json.loads((bad_out / "manifest.json").read_text())
    assert {p: p.stat().st_mtime_ns for p in bad_out.rglob("*")} == before

    copy = bad_out.parent / "copy"
    ingest("emotion6", bad_tree, copy, reader_options={"split_ratios": [1.0, 0.0, 0.0]}, show_progress=False)
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("ingested 4 images (train 4 / val 0 / test 0), skipped 8 (reasons: ")
    assert "truncated 1" in summary and "path escapes dataset root 2" in summary
    replaced = ingest("emotion6", bad_tree, copy, max_side=16, overwrite=True, show_progress=False)
    assert replaced["params"]["max_side"] == 16
    assert sum(replaced["counts"].values()) == 4  # default split: some rows may move to val/test
    sides = [max(Image.open(io.BytesIO(row["image"])).size)
             for split in SPLITS for row in _rows(copy, split)]
    assert len(sides) == 4 and max(sides) == 16
    assert not list(copy.parent.glob("copy.tmp-*"))


def test_crash_keeps_previous_output_and_never_looks_complete(ray_session, bad_tree, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    first = ingest("emotion6", bad_tree, out, show_progress=False)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(ingest_module, "_write_manifest", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ingest("emotion6", bad_tree, out, overwrite=True, max_side=16, show_progress=False)
    assert json.loads((out / "manifest.json").read_text()) == first  # the previous output is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]  # the partial one was removed

    # A hard kill skips the clean-up: what is left is a tmp folder that is not an output.
    monkeypatch.setattr(ingest_module.shutil, "rmtree", lambda *a, **k: None)
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="simulated crash"):
        ingest("emotion6", bad_tree, fresh, show_progress=False)
    leftovers = [p for p in tmp_path.iterdir() if p.name != "shards"]
    assert not fresh.exists() and len(leftovers) == 1 and leftovers[0].name.startswith("fresh.tmp-")
    assert not ingest_module.is_ingested(leftovers[0]) and list(leftovers[0].glob("*/*.parquet"))


def test_max_side_0_stores_each_original_file_and_still_skips_bad_ones(bad_tree, bad_out, tmp_path):
    out = tmp_path / "originals"
    manifest = ingest("emotion6", bad_tree, out, max_side=0, reader_options={"split_ratios": [1.0, 0.0, 0.0]},
                      show_progress=False)
    rows = _rows(out, "train")
    assert len(rows) == 4 and manifest["params"]["max_side"] == 0
    for row in rows:  # byte for byte the file on disk: not re-encoded, not shrunk, a PNG stays a PNG
        assert row["image"] == (bad_tree / row["image_id"]).read_bytes(), row["image_id"]
    formats = {row["image_id"]: Image.open(io.BytesIO(row["image"])).format for row in rows}
    assert formats["images/joy/rgba.png"] == "PNG" and formats["images/fear/gray16.png"] == "PNG"
    # Validated as when re-encoding: the same files are skipped, for the same reasons.
    reasons = lambda m: sorted((item["path"], item["reason"].split(":")[0]) for item in m["skipped"])  # noqa: E731
    assert reasons(manifest) == reasons(json.loads((bad_out / "manifest.json").read_text()))
    assert len(manifest["skipped"]) == 8


def _ser30k_tree(root: Path) -> Path:
    """A tiny SER30K tree whose train.json lists Images/cat/1.jpg twice."""
    for name in ("1.jpg", "2.jpg", "3.jpg"):
        (root / "Images" / "cat").mkdir(parents=True, exist_ok=True)
        (root / "Images" / "cat" / name).write_bytes(encode(noise(12, 10), "JPEG"))
    entry = lambda name: {"topic": "cat", "file_name": name, "text": "", "anno": 1}  # noqa: E731
    splits = {"train": [entry("1.jpg"), entry("1.jpg"), entry("2.jpg")], "val": [entry("3.jpg")], "test": []}
    (root / "Annotations" / "image-level").mkdir(parents=True)
    for split, annotations in splits.items():
        (root / "Annotations" / "image-level" / f"{split}.json").write_text(json.dumps({"annotations": annotations}))
    return root


def test_ser30k_keep_duplicates_writes_an_entry_listed_twice_as_two_rows(ray_session, tmp_path):
    root = _ser30k_tree(tmp_path / "ser30k")
    twice = ingest("ser30k", root, tmp_path / "twice", reader_options={"keep_duplicates": True}, show_progress=False)
    once = ingest("ser30k", root, tmp_path / "once", show_progress=False)
    ids = lambda out: sorted(row["image_id"] for row in _rows(out, "train"))  # noqa: E731
    assert ids(tmp_path / "twice") == ["Images/cat/1.jpg", "Images/cat/1.jpg", "Images/cat/2.jpg"]
    assert ids(tmp_path / "once") == ["Images/cat/1.jpg", "Images/cat/2.jpg"]
    assert twice["counts"]["train"] == 3 and twice["num_skipped"] == 0
    assert once["counts"]["train"] == 2 and once["skipped"][0]["reason"] == "listed more than once"


def test_map_step_rechecks_paths_at_read_time(tmp_path):
    """Records are re-checked when read: a file gone since listing, or a path out of the root."""
    import pyarrow as pa

    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "ok.png").write_bytes(encode(noise(30, 10), "PNG"))
    (tmp_path / "secret.png").write_bytes(encode(noise(30, 10), "PNG"))
    paths = ["ok.png", "gone.jpg", "../secret.png", str(tmp_path / "secret.png")]
    batch = pa.Table.from_pylist([{"path": p, "split": "train", "label": 1, "label_dist": None, "valence": None,
                                   "arousal": None, "va_source": "none", "text": "", "group": ""} for p in paths])
    out = ingest_module.load_and_prepare(batch, str(tmp_path / "root"), max_side=16, max_pixels=10**6)
    assert out.column("error").to_pylist() == [None, "missing on disk", "path escapes dataset root",
                                              "path escapes dataset root"]
    assert [x is None for x in out.column("image").to_pylist()] == [False, True, True, True]
    assert Image.open(io.BytesIO(out.column("image")[0].as_py())).size == (16, 5)


def test_bad_root_and_foreign_out_fail_before_ray(tmp_path, bad_tree):
    with pytest.raises(FileNotFoundError, match="nope: dataset root not found"):
        ingest("emotion6", tmp_path / "nope", tmp_path / "out")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an ingest output"):
        ingest("emotion6", bad_tree, foreign)
    folder_tree = tmp_path / "fi" / "Joy"
    folder_tree.mkdir(parents=True)
    (folder_tree / "a.jpg").write_bytes(encode(noise(8, 8), "JPEG"))
    with pytest.raises(FileNotFoundError, match="lex.txt: no such file"):  # the reader's error, unchanged
        ingest("folder", tmp_path / "fi", tmp_path / "out", lexicon_path=tmp_path / "lex.txt")
    with pytest.raises(ValueError, match="does not take categories"):
        ingest("emotion6", bad_tree, tmp_path / "out", reader_options={"categories": "FI"})
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="manifest.json: not found"):
        ingest_module.read_manifest(foreign)


def test_manifest_from_another_schema_version_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 999}))
    with pytest.raises(ValueError, match="schema_version 999"):
        load_split(tmp_path, "train")


# ----------------------------------------------------------------------------- demo round trip

@pytest.fixture(scope="module")
def demo_out(ray_session, tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("demo")
    root = make_demo(base / "data", images_per_class=4, seed=0, image_size=32)["emotion6"]
    out = base / "shards"
    ingest("emotion6", root, out, show_progress=False)
    return root, out


def _target_rows(batch: dict) -> np.ndarray:
    """label, valence, arousal, label_dist per row, sorted, as one array (order-free comparison)."""
    rows = np.column_stack([np.asarray(batch["label"], np.float64), np.asarray(batch["valence"]),
                            np.asarray(batch["arousal"]), np.asarray(batch["label_dist"])])
    return rows[np.lexsort(rows.T[::-1])]


def test_round_trip_demo_to_tensors(demo_out):
    root, out = demo_out
    records = read_dataset("emotion6", root).records
    train = [r for r in records if r.split == "train"]
    batch = load_split(out, "train").map_batches(
        ImageTransform(ImagePrep(size=32), train=True, num_classes=7, seed=0), batch_format="numpy").take_batch(1000)
    # Compact batches: uint8 pixels (the worker normalises on its device).
    assert batch["image"].shape == (len(train), 3, 32, 32) and batch["image"].dtype == np.uint8
    assert set(batch) == {"image", "label", "has_label", "label_dist", "has_dist", "valence", "arousal", "has_va", "va_lexicon"}
    assert batch["has_label"].all() and batch["has_dist"].all() and batch["has_va"].all()
    expected = _target_rows({"label": [r.label for r in train], "valence": [r.valence for r in train],
                             "arousal": [r.arousal for r in train], "label_dist": [r.label_dist for r in train]})
    np.testing.assert_allclose(_target_rows(batch), expected, atol=1e-6)
    tensors = to_tensors(batch)
    assert tensors["image"].dtype == torch.uint8 and tensors["label"].dtype == torch.int64


def test_local_batches_equal_ray_batches(demo_out):
    _, out = demo_out
    transform = ImageTransform(ImagePrep(size=32), train=False, num_classes=7)
    ray_batch = load_split(out, "train").map_batches(transform, batch_format="numpy").take_batch(1000)
    local = list(iter_local_batches(out, "train", transform, batch_size=5))
    assert [len(b["label"]) for b in local[:-1]] == [5] * (len(local) - 1)
    merged = {key: np.concatenate([b[key].numpy() for b in local]) for key in ray_batch}
    order_ray = np.lexsort([ray_batch["image"].reshape(len(ray_batch["image"]), -1).sum(1)])
    order_local = np.lexsort([merged["image"].reshape(len(merged["image"]), -1).sum(1)])
    for key in ray_batch:
        np.testing.assert_allclose(merged[key][order_local], ray_batch[key][order_ray], atol=1e-6, err_msg=key)


def test_local_shuffle_is_seeded(demo_out):
    _, out = demo_out
    transform = ImageTransform(ImagePrep(size=32), train=False, num_classes=7)

    def labels(**kwargs):
        return np.concatenate([b["valence"].numpy() for b in iter_local_batches(out, "train", transform, 4, **kwargs)])

    plain, a, b, c = labels(), labels(shuffle=True, seed=1), labels(shuffle=True, seed=1), labels(shuffle=True, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, plain)
    np.testing.assert_array_equal(np.sort(a), np.sort(plain))
    # part=(rank, world): the ranks' shares of the same order interleave back into it, row for row.
    parts = [labels(shuffle=True, seed=1, part=(rank, 2)) for rank in range(2)]
    assert len(parts[0]) - len(parts[1]) in (0, 1)
    interleaved = np.empty_like(a)
    interleaved[0::2], interleaved[1::2] = parts
    np.testing.assert_array_equal(interleaved, a)


def test_ingest_writes_the_classes_mixed(demo_out):
    """Rows are written in a fixed random order, not the reader's class-by-class listing: a split
    streamed from its files (only file order and a local buffer shuffle it) still mixes classes."""
    _, out = demo_out
    labels = np.concatenate([pq.read_table(f, columns=["label"])["label"].to_numpy()
                             for f in sorted((out / "train").glob("*.parquet"))])
    runs = 1 + int(np.count_nonzero(np.diff(labels)))
    classes = len(set(labels.tolist()))
    assert classes >= 5 and runs > 2 * classes, labels  # listed class by class: runs == classes


def _ids(ds) -> list[str]:
    return [row["image_id"] for row in ds.select_columns(["image_id"]).iter_rows()]


def test_a_small_split_is_read_once_into_blocks_whose_order_changes_every_epoch(demo_out, monkeypatch, tmp_path):
    import shutil

    import datasets_io.ray_data as ray_data
    from datasets_io.shards import read_split_table

    _, source = demo_out
    out = tmp_path / "shards"
    shutil.copytree(source, out)
    monkeypatch.setattr(ray_data, "BLOCK_ROWS", 4)
    ds = load_split(out, "train", shuffle_seed=3)
    stored = read_split_table(out, "train")["image_id"].to_pylist()
    for f in (out / "train").glob("*.parquet"):
        f.unlink()  # held in Ray's object store: the epochs below read no file
    epochs = [_ids(ds) for _ in range(4)]
    permuted = [stored[i] for i in np.random.default_rng(3).permutation(len(stored))]
    blocks = sorted(tuple(permuted[i:i + 4]) for i in range(0, len(permuted), 4))
    assert len(blocks) >= 4
    for ids in epochs:
        # The seeded permutation's blocks of BLOCK_ROWS rows, each whole, in an order drawn per epoch.
        assert sorted(tuple(ids[i:i + 4]) for i in range(0, len(ids), 4)) == blocks
    assert len({tuple(ids) for ids in epochs}) > 1
    assert load_split(out, "val").count() == len(read_split_table(out, "val"))  # eval splits: file order, no draw


def test_training_datasets_reorder_the_train_split_only(demo_out, monkeypatch):
    import datasets_io.ray_data as ray_data
    from datasets_io.shards import read_split_table
    from pipelines.data import training_datasets

    _, out = demo_out
    monkeypatch.setattr(ray_data, "BLOCK_ROWS", 4)
    seeds, real = {}, ray_data.load_split

    def recording(path, split, **kwargs):
        seeds[split] = kwargs.get("shuffle_seed")
        return real(path, split, **kwargs)

    monkeypatch.setattr(ray_data, "load_split", recording)
    from datasets_io.prep import ImagePrep
    from pipelines.data import check_shards

    manifest = check_shards(out, role="test", splits=("train",))
    sets = training_datasets(manifest, ImagePrep(size=32, decode="device"), num_classes=7, seed=5)  # train keeps image_id
    assert seeds == {"train": 5, "val": None}  # evaluation splits keep their order
    stored = read_split_table(out, "train")["image_id"].to_pylist()
    epochs = [[str(i) for batch in sets["train"].iter_batches(batch_format="numpy") for i in batch["image_id"]]
              for _ in range(4)]
    assert all(sorted(ids) == sorted(stored) for ids in epochs)
    assert len({tuple(ids) for ids in epochs}) > 1 and all(ids != stored for ids in epochs)
    assert sorted(int(x) for b in sets["val"].iter_batches(batch_format="numpy") for x in b["label"]) == \
        sorted(read_split_table(out, "val")["label"].to_pylist())


def test_a_large_split_streams_from_its_files(demo_out):
    _, out = demo_out
    ds = load_split(out, "train", shuffle_seed=0, in_memory_mb=0)
    assert sorted(_ids(ds)) == sorted(pq.read_table(out / "train", columns=["image_id"])["image_id"].to_pylist())


# ----------------------------------------------------------------------------- transform

def _batch_of(images: list[bytes], **columns) -> dict:
    n = len(images)
    batch = {"image": np.array(images, dtype=object), "image_id": np.array([f"{i}.jpg" for i in range(n)], object),
             "label": np.arange(n), "label_dist": np.array([None] * n, dtype=object),
             "valence": np.full(n, np.nan, np.float32), "arousal": np.full(n, np.nan, np.float32),
             "text": np.array(["hi"] * n, dtype=object)}
    batch.update(columns)
    return batch


def test_eval_transform_normalises_known_colour():
    grey = encode(Image.new("RGB", (48, 40), (128, 64, 200)), "PNG")
    prep = ImagePrep(size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    out = ImageTransform(prep, train=False, num_classes=3)(_batch_of([grey]))
    assert out["image"].shape == (1, 3, 16, 16) and out["image"].dtype == np.uint8
    pixels = prep.norm()(torch.from_numpy(out["image"]))
    np.testing.assert_allclose(pixels[0, :, 8, 8].numpy(), [(128 / 255 - 0.5) / 0.25, (64 / 255 - 0.5) / 0.5,
                                                            (200 / 255 - 0.5) / 1.0], atol=1e-5)
    assert not out["has_va"].any() and (out["valence"] == 0).all() and not out["has_dist"].any()
    assert "text" not in out


def test_nullable_targets_and_text():
    images = [encode(noise(20, 20, seed=i), "JPEG") for i in range(3)]
    batch = _batch_of(images, label=np.array([2, -1, 0]),
                      label_dist=np.array([None, np.array([0.5, 0.5, 0.0], np.float32), None], dtype=object),
                      valence=np.array([0.5, np.nan, -0.25], np.float32), arousal=np.array([0.1, 0.2, 0.3], np.float32))
    out = ImageTransform(ImagePrep(size=8), train=False, num_classes=3, keep_text=True)(batch)
    np.testing.assert_array_equal(out["has_label"], [True, False, True])
    np.testing.assert_array_equal(out["label"], [2, -1, 0])
    np.testing.assert_array_equal(out["has_dist"], [False, True, False])
    np.testing.assert_allclose(out["label_dist"], [[0, 0, 0], [0.5, 0.5, 0], [0, 0, 0]])
    np.testing.assert_array_equal(out["has_va"], [True, False, True])
    np.testing.assert_allclose(out["valence"], [0.5, 0.0, -0.25])
    assert out["text"].tolist() == ["hi"] * 3
    with pytest.raises(ValueError, match="num_classes=4"):
        ImageTransform(ImagePrep(size=8), train=False, num_classes=4)(batch)


@pytest.mark.parametrize("augment", ["basic", "randaugment"])
def test_train_augmentation_is_seeded_per_image(augment):
    images = [encode(noise(40, 30, seed=i), "JPEG") for i in range(4)]
    batch = _batch_of(images)
    first = ImageTransform(ImagePrep(size=24, augment=augment), train=True, num_classes=4, seed=3)(batch)["image"]
    again = ImageTransform(ImagePrep(size=24, augment=augment), train=True, num_classes=4, seed=3)(batch)["image"]
    other = ImageTransform(ImagePrep(size=24, augment=augment), train=True, num_classes=4, seed=4)(batch)["image"]
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    # per image, not per position: the same image alone gets the same augmentation
    alone = ImageTransform(ImagePrep(size=24, augment=augment), train=True, num_classes=4, seed=3)(
        _batch_of(images[2:3], image_id=np.array(["2.jpg"], object), label=np.array([2])))["image"]
    np.testing.assert_array_equal(alone[0], first[2])
    evaluated = ImageTransform(ImagePrep(size=24), train=False, num_classes=4)(batch)["image"]
    assert first.shape == evaluated.shape == (4, 3, 24, 24) and not np.allclose(first, evaluated)


def test_unseeded_transform_differs_between_pickled_copies():
    import pickle

    batch = _batch_of([encode(noise(40, 30, seed=i), "JPEG") for i in range(4)])
    transform = ImageTransform(ImagePrep(size=24), train=True, num_classes=4)
    copies = [pickle.loads(pickle.dumps(transform))(batch)["image"] for _ in range(2)]
    assert not np.allclose(copies[0], copies[1])


def test_numpy_batch_matches_schema_columns(demo_out):
    _, out = demo_out
    batch = numpy_batch(pq.read_table(out / "train"))
    assert list(batch) == list(COLUMNS) and batch["image"].dtype == object


# ----------------------------------------------------------------------------- real sample and CLI

def test_emotion6_real_sample(ray_session, emotion6_sample, tmp_path):
    manifest = ingest("emotion6", emotion6_sample, tmp_path / "e6", show_progress=False)
    assert sum(manifest["counts"].values()) == 48 and manifest["num_skipped"] == 0
    assert sum(pq.read_table(tmp_path / "e6" / split).num_rows for split in SPLITS) == 48
    assert manifest["classes"] == ["anger", "disgust", "fear", "joy", "sadness", "surprise", "neutral"]


def test_cli_error_is_one_line_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "datasets_io", "ingest", "--layout", "emotion6",
                             "--root", str(tmp_path / "missing"), "--out", str(tmp_path / "out")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'}: dataset root not found "
                                                  "(or not a folder)"]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


RAY_CHATTER = re.compile(r"Ray|ray\.|INFO|WARNING|Token|dashboard|logging_progress|Execution plan|Running Dataset")


def test_cli_console_is_quiet_when_piped(bad_tree, tmp_path):
    """Piped (no terminal): a line per split, the summary with the skipped files counted by reason, nothing of
    Ray's (no token warning, no start line, no plan, no progress blocks), no bar."""
    result = subprocess.run([sys.executable, "-m", "datasets_io", "ingest", "--layout", "emotion6", "--root",
                             str(bad_tree), "--out", str(tmp_path / "out"), "--split-ratios", "1", "0", "0"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[:3] == ["train: 4 images written, 5 skipped", "val: 0 images written, 0 skipped",
                         "test: 0 images written, 0 skipped"], result.stdout
    assert len(lines) == 4 and lines[3].startswith("ingested 4 images (train 4 / val 0 / test 0), skipped 8 "
                                                   "(reasons: ")
    assert "path escapes dataset root 2" in lines[3] and "truncated 1" in lines[3]
    assert not any(name in result.stdout for name in ("truncated.jpg", "bomb.png", "missing.jpg"))  # counted only
    assert result.stderr == "" and not RAY_CHATTER.search(result.stdout), result.stdout + result.stderr


def test_cli_passes_console_split_and_duplicate_options(tmp_path, monkeypatch):
    from datasets_io.__main__ import main

    calls = []
    monkeypatch.setattr(ingest_module, "ingest", lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.chdir(tmp_path)
    assert main(["ingest", "--layout", "emotion6", "--root", "e6", "--out", "o", "--max-side", "0", "--verbose",
                 "--train-list", "train.txt", "--test-list", "lists/test.txt", "--val-fraction", "0.25"]) == 0
    assert main(["ingest", "--layout", "ser30k", "--root", "s", "--out", "o", "--keep-duplicates"]) == 0
    (args, emotion6), (_, ser30k) = calls
    assert args == ("emotion6", "e6", "o") and emotion6["max_side"] == 0 and emotion6["verbose"] is True
    assert emotion6["split_lines"] is True and ser30k["verbose"] is None  # None: EMOTION_RAY_VERBOSE decides
    assert emotion6["reader_options"] == {"train_list": str(tmp_path / "train.txt"),
                                          "test_list": str(tmp_path / "lists" / "test.txt"), "val_fraction": 0.25}
    assert ser30k["reader_options"] == {"keep_duplicates": True}


def test_cli_bad_split_list_is_one_line(tmp_path, capsys, monkeypatch):
    from datasets_io.__main__ import main

    root = tmp_path / "e6"
    (root / "images" / "joy").mkdir(parents=True)
    (root / "images" / "joy" / "1.jpg").write_bytes(encode(noise(8, 8), "JPEG"))
    (root / "ground_truth.txt").write_text(EMOTION6_HEADER + "\n" + _emotion6_row("joy/1.jpg", 5, 5, 3) + "\n")
    (tmp_path / "train.txt").write_text("joy/1.jpg\n")
    (tmp_path / "test.txt").write_text("joy/1.jpg\n")
    monkeypatch.chdir(tmp_path)
    assert main(["ingest", "--layout", "emotion6", "--root", str(root), "--out", str(tmp_path / "o"),
                 "--train-list", "train.txt", "--test-list", "test.txt"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {tmp_path / 'test.txt'}:1: joy/1.jpg is given twice (also at {tmp_path / 'train.txt'}:1)"]
    assert not (tmp_path / "o").exists()


def test_cli_reader_error_and_demo(tmp_path, capsys):
    from datasets_io.__main__ import main

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ground_truth.txt").write_text(EMOTION6_HEADER + "\na.jpg\t5\t5\n")
    assert main(["ingest", "--layout", "emotion6", "--root", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "ground_truth.txt:2: expected 10 fields" in err[0]
    assert main(["demo", "--out", str(tmp_path / "demo"), "--images-per-class", "1", "--image-size", "16"]) == 0
    assert (tmp_path / "demo" / "emotion6" / "ground_truth.txt").is_file()
