"""Demo generator: real layouts the readers parse, a measurable VA signal, determinism, caching."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import rgb_to_hsv
from PIL import Image

from datasets_io.demo import SER30K_WORDS, ensure_demo, make_demo
from datasets_io.paths import cache_dir
from datasets_io.lexicon import CATEGORY_SETS
from datasets_io.readers import read_emotion6, read_folder, read_ser30k

PER_CLASS = 16


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    return make_demo(tmp_path_factory.mktemp("demo"), images_per_class=PER_CLASS, image_size=32)


def _features(path: Path) -> tuple[float, float, float, float]:
    """(warmth = mean R - B, brightness = mean HSV value, mean saturation, mean absolute gradient)."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255
    hsv = rgb_to_hsv(rgb)
    gray = rgb.mean(axis=-1)
    gradient = np.abs(np.diff(gray, axis=0)).mean() + np.abs(np.diff(gray, axis=1)).mean()
    return (rgb[..., 0] - rgb[..., 2]).mean(), hsv[..., 2].mean(), hsv[..., 1].mean(), gradient


def _assert_va_signal(root: Path, records) -> None:
    features = np.array([_features(root / r.path) for r in records])
    valence = np.array([r.valence for r in records])
    arousal = np.array([r.arousal for r in records])
    for column, target, what in ((0, valence, "warmth~valence"), (1, valence, "brightness~valence"),
                                 (2, arousal, "saturation~arousal"), (3, arousal, "texture~arousal")):
        r = np.corrcoef(features[:, column], target)[0, 1]
        assert r > 0.6, f"{what}: Pearson {r:.2f}"


def test_fi_demo_parses_and_carries_the_signal(demo):
    result = read_folder(demo["fi"], categories="FI")
    assert result.skipped == []
    assert Counter(r.label for r in result.records) == {label: PER_CLASS for label in range(8)}
    assert sorted(p.name for p in demo["fi"].iterdir()) == sorted(c.capitalize() for c in CATEGORY_SETS["FI"])
    with Image.open(demo["fi"] / result.records[0].path) as image:
        assert (image.format, image.size) == ("JPEG", (32, 32))
    # The lexicon anchors are the labels here: colour and texture must follow them.
    _assert_va_signal(demo["fi"], result.records)


def test_emotion6_demo_varies_within_folders(demo):
    result = read_emotion6(demo["emotion6"])
    assert result.skipped == [] and len(result.records) == 6 * PER_CLASS
    assert Counter(r.group for r in result.records) == {g: PER_CLASS for g in
                                                        ("anger", "disgust", "fear", "joy", "sadness", "surprise")}
    for record in result.records:  # probabilities peak on the folder's emotion
        assert result.classes[record.label] == record.group
        assert sum(record.label_dist) == pytest.approx(1, abs=1e-5)
        assert round(4 * record.valence + 5, 1) == pytest.approx(4 * record.valence + 5)  # one decimal SAM
    spread = [np.std([r.valence for r in result.records if r.group == g]) for g in ("joy", "sadness")]
    assert min(spread) > 0.1
    _assert_va_signal(demo["emotion6"], result.records)


def test_ser30k_demo_splits_formats_and_texts(demo):
    result = read_ser30k(demo["ser30k"])
    assert result.skipped == [] and len(result.records) == 7 * PER_CLASS
    splits = Counter(r.split for r in result.records)
    assert splits["train"] > splits["val"] > 0 and splits["test"] > 0
    assert splits["train"] == pytest.approx(0.7 * len(result.records), abs=7)
    assert {Path(r.path).suffix for r in result.records} == {".jpg", ".png"}
    assert len({r.group for r in result.records}) > 2
    hits = []
    for record in result.records:
        words = set(record.text.split())
        own = set(SER30K_WORDS[result.classes[record.label]])
        others = set().union(*SER30K_WORDS.values()) - own
        assert not words & others
        hits.append(bool(words & own))
    assert 0.5 < np.mean(hits) < 0.9


def test_same_seed_same_bytes(tmp_path):
    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    options = dict(images_per_class=2, image_size=16)
    first = files(make_demo(tmp_path / "a", seed=5, **options)["fi"].parent)
    assert first == files(make_demo(tmp_path / "b", seed=5, **options)["fi"].parent)
    other = files(make_demo(tmp_path / "c", seed=6, **options)["fi"].parent)
    shared = [name for name in first if name.startswith("fi/")]
    assert shared and all(other[name] != first[name] for name in shared)
    only_fi = files(make_demo(tmp_path / "d", seed=5, which=("fi",), **options)["fi"].parent)
    assert only_fi == {k: v for k, v in first.items() if k.startswith("fi/")}
    with pytest.raises(FileExistsError, match="not empty"):
        make_demo(tmp_path / "d", which=("fi",))


def test_ensure_demo_builds_once_and_rebuilds_on_new_params(tmp_path, monkeypatch):
    monkeypatch.setenv("EMOTION_RAY_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    roots = ensure_demo(images_per_class=1, image_size=16, which=("fi",))
    assert roots == {"fi": tmp_path / "cache" / "demo" / "fi"}
    marker = tmp_path / "cache" / "demo" / ".complete"
    stamp = marker.stat().st_mtime_ns
    assert ensure_demo(images_per_class=1, image_size=16, which=("fi",)) == roots
    assert marker.stat().st_mtime_ns == stamp
    ensure_demo(images_per_class=2, image_size=16, which=("fi",))
    assert len(list(roots["fi"].rglob("*.jpg"))) == 16
    with pytest.raises(ValueError, match="unknown option"):
        ensure_demo(size=3)
