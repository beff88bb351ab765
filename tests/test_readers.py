"""Readers: folder, label-distribution table, Emotion6, SER30K, and the dispatcher."""
from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets_io.lexicon import CATEGORY_SETS, Lexicon, sam_to_canonical
from datasets_io.layouts import LAYOUTS, read_dataset
from datasets_io.readers import ESCAPES, MISSING, read_emotion6, read_folder, read_ldl, read_ser30k, stratified_split

FI = CATEGORY_SETS["FI"]


@pytest.fixture(scope="module")
def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 100, 50)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def write(jpeg_bytes):
    """write(root, *relative paths): tiny JPEGs at those paths."""
    def _write(root: Path, *paths: str) -> None:
        for rel in paths:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(jpeg_bytes)
    return _write


def _fi_tree(root: Path, write, per_class: int, prefix: str = "") -> None:
    """FI-like folders with capitalised names, as FI ships."""
    for name in FI:
        write(root, *(f"{prefix}{name.capitalize()}/{name}_{i:03d}.jpg" for i in range(per_class)))


# ----------------------------------------------------------------------------- folder

def test_folder_matches_names_case_insensitively_and_ignores_other_files(tmp_path, write):
    _fi_tree(tmp_path, write, 3)
    write(tmp_path, "Awe/extra.JPEG", "Anger/.hidden.jpg", "Anger/.ipynb_checkpoints/x.jpg", "Anger/sub/deep.png",
          "loose.jpg")
    (tmp_path / "Anger" / "notes.txt").write_text("not an image")
    result = read_folder(tmp_path, categories="FI")
    assert result.classes == FI
    by_path = {r.path: r for r in result.records}
    assert len(by_path) == 8 * 3 + 2
    assert {"Anger/sub/deep.png", "Awe/extra.JPEG"} <= set(by_path)
    record = by_path["Anger/anger_000.jpg"]
    assert (record.label, record.group, record.va_source) == (1, "anger", "lexicon")
    assert (record.valence, record.arousal) == pytest.approx(Lexicon.builtin().va("anger"))
    assert [r.path for r in result.records] == sorted(by_path)


def test_folder_seeded_split_is_stratified_and_deterministic(tmp_path, write):
    _fi_tree(tmp_path, write, 10)
    first = read_folder(tmp_path, categories="fi", seed=7)
    counts = Counter((r.group, r.split) for r in first.records)
    for name in FI:
        assert (counts[name, "train"], counts[name, "val"], counts[name, "test"]) == (8, 1, 1)
    assert first.params["split_source"] == "seeded"
    again = read_folder(tmp_path, categories="fi", seed=7)
    other = read_folder(tmp_path, categories="fi", seed=8)
    assert [r.split for r in again.records] == [r.split for r in first.records]
    assert [r.split for r in other.records] != [r.split for r in first.records]


def test_folder_uses_split_folders_when_present(tmp_path, write):
    for split, folder in (("train", "train"), ("val", "Valid"), ("test", "test")):
        write(tmp_path, f"{folder}/Positive/{split}1.jpg", f"{folder}/negative/{split}2.jpg",
              f"{folder}/Neutral/{split}3.jpg")
    result = read_folder(tmp_path, categories="Flickr")
    assert result.params["split_source"] == "folders"
    assert {r.path: r.split for r in result.records}["Valid/Positive/val1.jpg"] == "val"
    assert Counter(r.split for r in result.records) == {"train": 3, "val": 3, "test": 3}
    (tmp_path / "Valid").rename(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="no val or valid or validation folder"):
        read_folder(tmp_path, categories="Flickr")


def test_folder_infers_categories_from_folder_names(tmp_path, write):
    write(tmp_path, "Positive/a.jpg", "negative/b.jpg", "NEUTRAL/c.jpg")
    result = read_folder(tmp_path)
    assert result.classes == ["negative", "neutral", "positive"]
    assert {r.path: r.label for r in result.records} == {"negative/b.jpg": 0, "NEUTRAL/c.jpg": 1, "Positive/a.jpg": 2}


def test_folder_unknown_name_needs_a_lexicon_file(tmp_path, write):
    write(tmp_path, "serenity/a.jpg", "anger/b.jpg")
    with pytest.raises(ValueError, match="'serenity'.*known: amusement.*lexicon file"):
        read_folder(tmp_path)
    (tmp_path / "lex.txt").write_text("serenity\t0.9\t0.1\t0.5\n")
    result = read_folder(tmp_path, lexicon=tmp_path / "lex.txt")
    assert result.records[1].valence == pytest.approx(0.8)


def test_folder_category_mismatch(tmp_path, write):
    with pytest.raises(ValueError, match="no category folders"):
        read_folder(tmp_path)
    write(tmp_path, "positive/a.jpg", "negative/b.jpg", "neutral/c.jpg", "bored/d.jpg")
    with pytest.raises(ValueError, match=r"bored: folder is not one of the categories"):
        read_folder(tmp_path, categories="Flickr")
    (tmp_path / "neutral" / "c.jpg").unlink()
    (tmp_path / "neutral").rmdir()
    with pytest.raises(ValueError, match="no folder for category neutral"):
        read_folder(tmp_path, categories=["positive", "negative", "neutral", "bored"])


def test_folder_names_repeating_case_insensitively_are_an_error(tmp_path, write):
    write(tmp_path, "Anger/a.jpg", "ANGER/b.jpg")
    with pytest.raises(ValueError, match="repeats"):
        read_folder(tmp_path)


def test_folder_symlink_out_of_root_is_skipped(tmp_path, write):
    root = tmp_path / "root"
    write(root, "anger/a.jpg")
    write(tmp_path, "outside.jpg")
    (root / "anger" / "link.jpg").symlink_to(tmp_path / "outside.jpg")
    result = read_folder(root)
    assert [r.path for r in result.records] == ["anger/a.jpg"]
    assert result.skipped == [{"path": "anger/link.jpg", "reason": ESCAPES}]


# ----------------------------------------------------------------------------- label distributions

def _ldl_root(tmp_path: Path, write, table: str, name: str = "votes.csv") -> Path:
    write(tmp_path, "images/a.jpg", "images/b.jpg", "images/c.jpg")
    (tmp_path / name).write_text(table)
    return tmp_path


def test_ldl_counts_and_probabilities_give_the_same_distribution(tmp_path, write):
    counts = _ldl_root(tmp_path / "counts", write, "a.jpg,1,0,0,0,0,0,0,3\nb.jpg,0,2,0,0,0,0,2,0\n")
    header = "Fear\tSadness\tImage\tAmusement\tanger\tAWE\tcontentment\tdisgust\texcitement\n"
    probabilities = _ldl_root(tmp_path / "probs", write,
                              header + "0\t0.75\ta.jpg\t0.25\t0\t0\t0\t0\t0\n0.5\t0\tb.jpg\t0\t0.5\t0\t0\t0\t0\n",
                              name="votes.tsv")
    from_counts, from_probs = read_ldl(counts), read_ldl(probabilities)
    assert [r.path for r in from_counts.records] == ["images/a.jpg", "images/b.jpg"]
    for left, right in zip(from_counts.records, from_probs.records):
        assert left.label_dist == pytest.approx(right.label_dist)
        assert (left.label, left.valence, left.arousal) == pytest.approx((right.label, right.valence, right.arousal))
    a = from_counts.records[0]
    assert a.label_dist == pytest.approx([0.25, 0, 0, 0, 0, 0, 0, 0.75])
    assert a.label == FI.index("sadness")
    # 1/4 amusement (.929, .837) + 3/4 sadness (.052, .288), NRC 0..1 -> canonical 2x - 1
    assert a.valence == pytest.approx(0.25 * (2 * 0.929 - 1) + 0.75 * (2 * 0.052 - 1))
    assert a.arousal == pytest.approx(0.25 * (2 * 0.837 - 1) + 0.75 * (2 * 0.288 - 1))
    assert from_counts.records[1].label == FI.index("anger")  # a 2-2 tie goes to the first


def test_ldl_skips_missing_and_escaping_images(tmp_path, write):
    write(tmp_path, "secret.jpg")
    votes = ",1,0,0,0,0,0,0,0\n"
    root = _ldl_root(tmp_path / "root", write, "".join(name + votes for name in
                                                       ("a.jpg", "gone.jpg", "../secret.jpg", "/etc/hostname")))
    result = read_ldl(root)
    assert [r.path for r in result.records] == ["images/a.jpg"]
    assert result.skipped == [{"path": "images/gone.jpg", "reason": MISSING},
                              {"path": "images/../secret.jpg", "reason": ESCAPES},
                              {"path": "/etc/hostname", "reason": ESCAPES}]


@pytest.mark.parametrize("table, problem", [
    ("a.jpg,1,0,0,0,0,0,0,0\nb.jpg,1,0,0,x,0,0,0,0\n", ":2: vote for contentment: 'x' is not a number"),
    ("a.jpg,1,0,0,0,0,0,0,0\nb.jpg,0,0,0,0,0,0,0,0\n", ":2: all weights are zero"),
    ("a.jpg,1,0,0,0,0,0,0,0\nb.jpg,1,0,0\n", ":2: expected at least 9 fields"),
    ("name,amusement,anger,awe,contentment,disgust,excitement,fear\na.jpg,1,0,0,0,0,0,0\n",
     ":1: no column for sadness"),
])
def test_ldl_bad_table_names_file_and_line(tmp_path, write, table, problem):
    root = _ldl_root(tmp_path, write, table)
    with pytest.raises(ValueError, match=problem) as err:
        read_ldl(root)
    assert str(err.value).startswith(str(root / "votes.csv"))


def test_ldl_needs_one_table(tmp_path, write):
    root = _ldl_root(tmp_path, write, "a.jpg,1,0,0,0,0,0,0,0\n")
    (root / "other.txt").write_text("b.jpg,1,0,0,0,0,0,0,0\n")
    with pytest.raises(ValueError, match="exactly one .*found other.txt, votes.csv"):
        read_ldl(root)
    assert len(read_ldl(root, table="other.txt").records) == 1


def test_ldl_split_is_stratified_by_label(tmp_path, write):
    names = [f"{i}.jpg" for i in range(40)]
    write(tmp_path, *(f"images/{n}" for n in names))
    rows = [f"{n},{i % 2},{1 - i % 2},0,0,0,0,0,0" for i, n in enumerate(names)]
    (tmp_path / "t.csv").write_text("\n".join(rows))
    counts = Counter((r.label, r.split) for r in read_ldl(tmp_path, split_ratios=(0.5, 0.25, 0.25)).records)
    assert counts == {(0, "train"): 10, (0, "val"): 5, (0, "test"): 5, (1, "train"): 10, (1, "val"): 5,
                      (1, "test"): 5}


# ----------------------------------------------------------------------------- Emotion6

def test_emotion6_real_sample(emotion6_sample):
    result = read_emotion6(emotion6_sample)
    lines = (emotion6_sample / "ground_truth.txt").read_text().splitlines()[1:]
    valence = sam_to_canonical(np.array([float(line.split("\t")[1]) for line in lines]))
    assert len(result.records) == 48 and result.skipped == []
    assert Counter(r.group for r in result.records) == {name: 8 for name in
                                                        ("anger", "disgust", "fear", "joy", "sadness", "surprise")}
    got = np.array([r.valence for r in result.records])
    assert (got.mean(), got.min(), got.max()) == pytest.approx((valence.mean(), valence.min(), valence.max()))
    assert all(r.path == f"images/{r.group}/{Path(r.path).name}" and r.va_source == "measured"
               for r in result.records)
    assert all(sum(r.label_dist) == pytest.approx(1) and r.label == int(np.argmax(r.label_dist))
               for r in result.records)
    assert Counter(r.split for r in result.records) == {"train": 36, "val": 6, "test": 6}
    assert result.classes == CATEGORY_SETS["Emotion6"]


def test_emotion6_bad_rows_and_unsafe_paths(tmp_path, write):
    write(tmp_path, "images/joy/1.jpg")
    header = "[image_filename]\t[valence]\t[arousal]\t" + "\t".join(f"[p{i}]" for i in range(7)) + "\n"
    probs = "\t0\t0\t0\t0.6\t0\t0\t0.4\n"
    table = tmp_path / "ground_truth.txt"
    table.write_text(header + "joy/1.jpg\t7.5\t5" + probs + "joy/2.jpg\t7\t5" + probs + "../x.jpg\t7\t5" + probs)
    result = read_emotion6(tmp_path)
    assert [(r.path, r.valence, r.arousal, r.label) for r in result.records] == [("images/joy/1.jpg", 0.625, 0, 3)]
    assert [s["reason"] for s in result.skipped] == [MISSING, ESCAPES]
    table.write_text(header + "joy/1.jpg\t7.5\t5" + probs + "joy/1.jpg\t0.5\t5" + probs)
    with pytest.raises(ValueError, match=r"ground_truth.txt:3: valence/arousal 0.5/5 outside the SAM scale"):
        read_emotion6(tmp_path)
    table.write_text(header + "joy/1.jpg\t7.5\t5\t0.5\n")
    with pytest.raises(ValueError, match=r"ground_truth.txt:2: expected 10 fields"):
        read_emotion6(tmp_path)


# ----------------------------------------------------------------------------- SER30K

def _ser30k(root: Path, write, splits: dict[str, list[dict]], categories=None) -> Path:
    folder = root / "Annotations" / "image-level"
    folder.mkdir(parents=True)
    for split, annotations in splits.items():
        document = {"annotations": annotations}
        if categories is not None:
            document["categories"] = categories
        (folder / f"{split}.json").write_text(json.dumps(document))
        write(root, *(f"Images/{a['topic']}/{a['file_name']}" for a in annotations if "missing" not in a["file_name"]))
    return root


def _sticker(topic: str, name: str, anno, text="hi") -> dict:
    return {"topic": topic, "file_name": name, "text": text, "anno1": anno, "anno2": anno, "anno3": anno,
            "anno": anno}


def test_ser30k_default_classes(tmp_path, write):
    root = _ser30k(tmp_path, write, {"train": [_sticker("cat", "1.jpg", 4), _sticker("cat", "missing.png", 1)],
                                     "val": [_sticker("dog", "2.png", 1, text=None)],
                                     "test": [_sticker("dog", "3.jpg", 7, text="wow")]})
    result = read_ser30k(root)
    assert result.classes == CATEGORY_SETS["SER30K"]
    assert [(r.path, r.split, r.label, r.text, r.group) for r in result.records] == [
        ("Images/cat/1.jpg", "train", 3, "hi", "cat"), ("Images/dog/2.png", "val", 0, "", "dog"),
        ("Images/dog/3.jpg", "test", 6, "wow", "dog")]
    assert (result.records[0].valence, result.records[0].arousal) == Lexicon.builtin().va("joy")
    assert result.skipped == [{"path": "Images/cat/missing.png", "reason": MISSING}]


@pytest.mark.parametrize("categories", [
    ["sadness", "Happiness"],
    [{"id": 2, "name": "happiness"}, {"id": 1, "name": "sadness"}],
])
def test_ser30k_categories_field(tmp_path, write, categories):
    root = _ser30k(tmp_path, write, {split: [_sticker("cat", f"{split}.jpg", 2)] for split in ("train", "val", "test")},
                   categories=categories)
    result = read_ser30k(root)
    assert result.classes == ["sadness", "happiness"]
    assert {r.label for r in result.records} == {1}


def test_ser30k_errors(tmp_path, write):
    root = _ser30k(tmp_path, write, {"train": [_sticker("cat", "1.jpg", 1), _sticker("cat", "2.jpg", 8)],
                                     "val": [_sticker("../..", "x.jpg", 1)], "test": []})
    with pytest.raises(ValueError, match=r"train.json: annotation #1: anno 8 is not in 1..7"):
        read_ser30k(root)
    (root / "Annotations/image-level/train.json").write_text(json.dumps({"annotations": [_sticker("cat", "1.jpg", 1)]}))
    assert read_ser30k(root).skipped == [{"path": "Images/../../x.jpg", "reason": ESCAPES}]
    (root / "Annotations/image-level/test.json").unlink()
    with pytest.raises(FileNotFoundError, match="test.json: SER30K split file is missing"):
        read_ser30k(root)


# ----------------------------------------------------------------------------- shared pieces

def test_stratified_split_per_key_is_independent_of_other_keys():
    alone = stratified_split(["a"] * 10, seed=3)
    mixed = stratified_split(["a", "b"] * 10, seed=3)
    assert mixed[::2] == alone
    assert Counter(alone) == {"train": 8, "val": 1, "test": 1}
    assert stratified_split(["a"], seed=3) == ["train"]
    with pytest.raises(ValueError, match="summing to 1"):
        stratified_split(["a"], ratios=(0.8, 0.1, 0.2))


def test_read_dataset_dispatch_and_errors(tmp_path, write, emotion6_sample):
    assert LAYOUTS == ("folder", "ldl", "emotion6", "ser30k")
    assert len(read_dataset("emotion6", emotion6_sample, seed=1).records) == 48
    with pytest.raises(ValueError, match="unknown dataset layout 'coco'; known: folder, ldl"):
        read_dataset("coco", tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        read_dataset("folder", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="'emotion6' does not take categories; it takes split_ratios, seed"):
        read_dataset("emotion6", emotion6_sample, categories="FI")


# ----------------------------------------------------------------------------- Emotion6, a given split

E6_HEADER = "[image_filename]\t[valence]\t[arousal]\t" + "\t".join(f"[p{i}]" for i in range(7)) + "\n"
E6_PROBS = {"anger": "\t0.7\t0\t0\t0\t0\t0\t0.3", "joy": "\t0\t0\t0\t0.6\t0\t0\t0.4"}


def _emotion6_given(root: Path, write, per_class: int = 10, folders: bool = False) -> list[str]:
    """ground_truth.txt keys ``<emotion>/<n>.jpg``; images under images/ (or train/ + test/ if ``folders``,
    the first 7 of each emotion in train/ under the published name ``<emotion>_<n>.jpg``, the rest in test/)."""
    keys = [f"{emotion}/{n}.jpg" for emotion in E6_PROBS for n in range(1, per_class + 1)]
    (root / "ground_truth.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "ground_truth.txt").write_text(E6_HEADER + "".join(
        f"{key}\t5\t5{E6_PROBS[key.split('/')[0]]}\n" for key in keys))
    for key in keys:
        emotion, name = key.split("/")
        if not folders:
            write(root, f"images/{key}")
        elif int(name.split(".")[0]) <= 7:
            write(root, f"train/{emotion}/{emotion}_{name}")
        else:
            write(root, f"test/{emotion}/{name}")
    return keys


def _lists(tmp_path: Path, train: list[str], test: list[str]) -> dict:
    (tmp_path / "train.txt").write_text("\n".join(train) + "\n")
    (tmp_path / "test.txt").write_text("\n".join(test) + "\n")
    return {"train_list": tmp_path / "train.txt", "test_list": tmp_path / "test.txt"}


def test_emotion6_train_and_test_lists_give_the_split(tmp_path, write):
    root = tmp_path / "e6"
    keys = _emotion6_given(root, write)
    test = [k for k in keys if k.endswith(("/9.jpg", "/10.jpg"))]
    train = [k for k in keys if k not in test]
    result = read_emotion6(root, **_lists(tmp_path, train, test), seed=3)
    splits = {r.path: r.split for r in result.records}
    assert result.params["split_source"] == "lists" and result.params["val_fraction"] == 0.2
    assert result.params["train_list"] == str(tmp_path / "train.txt")
    assert sorted(p for p, s in splits.items() if s == "test") == sorted(f"images/{k}" for k in test)
    held_out = [p for p, s in splits.items() if s == "val"]
    assert len(held_out) == round(0.2 * len(train)) == 3 and Counter(splits.values())["train"] == 13
    assert set(held_out) <= {f"images/{k}" for k in train}        # val is drawn from the given train images
    assert [r.label for r in result.records if r.path == "images/joy/1.jpg"] == [3]
    again = read_emotion6(root, **_lists(tmp_path, train, test), seed=3)
    other = read_emotion6(root, **_lists(tmp_path, train, test), seed=4)
    assert [r.split for r in again.records] == [r.split for r in result.records]
    assert sorted(r.path for r in other.records if r.split == "val") != sorted(held_out)
    half = read_emotion6(root, **_lists(tmp_path, train, test), val_fraction=0.5)
    assert Counter(r.split for r in half.records) == {"train": 8, "val": 8, "test": 4}
    # A path may not leave the root: listed in ground_truth.txt and a list, it is skipped as unsafe.
    (root / "ground_truth.txt").write_text((root / "ground_truth.txt").read_text()
                                           + f"../x.jpg\t5\t5{E6_PROBS['joy']}\n")
    unsafe = read_emotion6(root, **_lists(tmp_path, train + ["../x.jpg"], test))
    assert unsafe.skipped == [{"path": "images/../x.jpg", "reason": ESCAPES}] and len(unsafe.records) == 20


@pytest.mark.parametrize("train, test, problem", [
    (["anger/1.jpg", "anger/2.jpg"], ["joy/1.jpg", "anger/2.jpg"], r"test.txt:2: anger/2.jpg is given twice "
                                                                    r"\(also at .*train.txt:2\)"),
    (["anger/1.jpg", "anger/1.jpg"], ["joy/1.jpg"], r"train.txt:2: anger/1.jpg is given twice"),
    (["anger/1.jpg", "", "fear/1.jpg"], ["joy/1.jpg"], r"train.txt:3: fear/1.jpg is not in ground_truth.txt"),
    (["anger/1.jpg extra"], ["joy/1.jpg"], r"train.txt:1: expected one image path per line, got 2 fields"),
])
def test_emotion6_bad_lists_are_one_line_errors_naming_file_and_line(tmp_path, write, train, test, problem):
    root = tmp_path / "e6"
    _emotion6_given(root, write, per_class=2)
    with pytest.raises(ValueError, match=problem) as err:
        read_emotion6(root, **_lists(tmp_path, train, test))
    assert "\n" not in str(err.value) and str(err.value).startswith(str(tmp_path))


def test_emotion6_split_options_that_do_not_fit_are_errors(tmp_path, write):
    root = tmp_path / "e6"
    keys = _emotion6_given(root, write, per_class=2)
    lists = _lists(tmp_path, keys[:3], keys[3:])
    with pytest.raises(ValueError, match="train_list and test_list go together; got only train_list"):
        read_emotion6(root, train_list=lists["train_list"])
    with pytest.raises(ValueError, match="split_ratios applies to the seeded split"):
        read_emotion6(root, split_ratios=(0.8, 0.1, 0.1), **lists)
    with pytest.raises(ValueError, match="val_fraction applies to a given split"):
        read_emotion6(root, val_fraction=0.1)
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got 1"):
        read_emotion6(root, val_fraction=1, **lists)
    assert read_emotion6(root).params["split_source"] == "seeded"


def test_emotion6_published_train_and_test_folders(tmp_path, write):
    root = tmp_path / "e6"
    _emotion6_given(root, write, folders=True)
    result = read_emotion6(root, seed=1)
    assert result.params["split_source"] == "folders" and "train_list" not in result.params
    by_path = {r.path: r for r in result.records}
    assert len(by_path) == 20 and result.skipped == []
    assert sorted(p for p, r in by_path.items() if r.split == "test") == sorted(
        f"test/{e}/{n}.jpg" for e in E6_PROBS for n in (8, 9, 10))
    assert Counter(r.split for r in result.records) == {"train": 11, "val": 3, "test": 6}   # 14 given train images
    record = by_path["train/joy/joy_1.jpg"]          # published name, looked up as joy/1.jpg
    assert (record.label, record.group, record.valence) == (3, "joy", 0.0)
    # Detection is unambiguous: images/ (Cornell's layout) wins over train/ and test/ folders.
    write(root, "images/anger/1.jpg")
    assert read_emotion6(root).params["split_source"] == "seeded"


def test_emotion6_published_folders_errors(tmp_path, write):
    root = tmp_path / "e6"
    _emotion6_given(root, write, per_class=8, folders=True)
    write(root, "test/anger/1.jpg")                   # anger/1.jpg is in train/ as anger_1.jpg too
    with pytest.raises(ValueError, match=r"test/anger/1.jpg: anger/1.jpg is given twice \(also at .*"
                                         r"train/anger/anger_1.jpg\)"):
        read_emotion6(root)
    (root / "test/anger/1.jpg").unlink()
    write(root, "train/fear/3.jpg")
    with pytest.raises(ValueError, match=r"train/fear/3.jpg: not in ground_truth.txt \(looked up as fear/3.jpg\)"):
        read_emotion6(root)
    (root / "train/fear/3.jpg").unlink()
    shutil.rmtree(root / "test")
    with pytest.raises(ValueError, match="no images/ folder, nor both train/ and test/ folders; found only train/"):
        read_emotion6(root)


def test_emotion6_real_sample_with_given_lists(emotion6_sample, tmp_path):
    keys = [line.split("\t")[0] for line in (emotion6_sample / "ground_truth.txt").read_text().splitlines()[1:]]
    test = keys[::4]
    result = read_emotion6(emotion6_sample, **_lists(tmp_path, [k for k in keys if k not in test], test))
    assert Counter(r.split for r in result.records) == {"train": 29, "val": 7, "test": 12}
    assert sorted(r.path for r in result.records if r.split == "test") == sorted(f"images/{k}" for k in test)


# ----------------------------------------------------------------------------- SER30K, duplicates

def test_ser30k_keep_duplicates_keeps_every_entry(tmp_path, write):
    root = _ser30k(tmp_path, write, {"train": [_sticker("cat", "1.jpg", 4), _sticker("cat", "1.jpg", 4),
                                               _sticker("cat", "2.jpg", 1)],
                                     "val": [_sticker("cat", "2.jpg", 1)], "test": []})
    once = read_ser30k(root)
    assert [(r.path, r.split) for r in once.records] == [("Images/cat/1.jpg", "train"), ("Images/cat/2.jpg", "train")]
    assert [s["reason"] for s in once.skipped] == ["listed more than once"] * 2
    twice = read_ser30k(root, keep_duplicates=True)
    assert sorted((r.path, r.split) for r in twice.records) == [
        ("Images/cat/1.jpg", "train"), ("Images/cat/1.jpg", "train"), ("Images/cat/2.jpg", "train"),
        ("Images/cat/2.jpg", "val")]
    assert twice.skipped == [] and twice.params["keep_duplicates"] is True and once.params["keep_duplicates"] is False
