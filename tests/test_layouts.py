"""The layout registry is the single source of layouts, dataset names and demo sets; the format and
the engine-free readers import no Ray; the path roots are defined once."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from datasets_io import layouts, paths
from datasets_io.layouts import (CAPABILITIES, DATASETS, DEMO_SETS, LAYOUTS, MEASURED_VA, OWN_SPLIT, REGISTRY,
                                 STICKERS, dataset_options, demo_key, detect_layout, get_layout, has, layout_of,
                                 reader_options, require)
from datasets_io.lexicon import CATEGORY_SETS
from datasets_io.records import MANIFEST_NAME, SCHEMA_VERSION

REPO = Path(__file__).resolve().parents[1]


def test_every_paper_dataset_name_resolves_to_a_registered_layout():
    assert set(DATASETS) == {"FI", "Flickr", "Instagram", "FlickrLDL", "TwitterLDL", "Emotion6", "SER30K"}
    for name in DATASETS:
        layout, options = dataset_options(name)
        assert layout in LAYOUTS and layout_of(name) == layout
        assert set(options) <= set(reader_options(layout)), name
        categories = options.get("categories")
        assert categories is None or categories in CATEGORY_SETS
    assert dataset_options("FlickrLDL") == ("ldl", {"categories": "FI"})
    assert dataset_options("Flickr") == ("folder", {"categories": "Flickr"})
    with pytest.raises(ValueError, match=r"^unknown dataset 'Nope'; known names: FI, "):
        dataset_options("Nope")


def test_pipelines_keep_no_table_of_their_own():
    from pipelines import data

    for name in ("DATANAMES", "DEMO_SETS", "detect_layout"):  # imported from the registry, or gone
        assert getattr(data, name, None) in (None, getattr(layouts, name, None)), name
    assert data.data_dir is paths.data_dir
    data.check_dataname("TwitterLDL")
    with pytest.raises(ValueError, match="known names: " + ", ".join(DATASETS)):
        data.check_dataname("Nope")


def test_capabilities_and_demo_roles():
    assert [layout.name for layout in REGISTRY] == list(LAYOUTS) == ["folder", "ldl", "emotion6", "ser30k"]
    assert {name for name in LAYOUTS if has(name, MEASURED_VA)} == {"emotion6"}
    assert {name for name in LAYOUTS if has(name, STICKERS)} == {"ser30k"}
    assert {name for name in LAYOUTS if has(name, OWN_SPLIT)} == {"ser30k"}
    assert "seed" not in reader_options("ser30k") and "seed" in reader_options("folder")
    assert layouts.ingest_options("ser30k", {"seed": 1, "lexicon": None}) == {"lexicon": None}
    assert not has("no-such-layout", MEASURED_VA)
    assert (demo_key("categorical"), demo_key("dimensional"), demo_key("sticker")) == ("fi", "emotion6", "ser30k")
    assert DEMO_SETS == {"fi": ("folder", {"categories": "FI"}), "emotion6": ("emotion6", {}),
                         "ser30k": ("ser30k", {})}
    with pytest.raises(ValueError, match="unknown dataset layout 'x'; known: folder, ldl, emotion6, ser30k"):
        get_layout("x")
    with pytest.raises(ValueError, match="unknown capability"):
        has("folder", "colour")


def test_require_is_one_line_naming_the_path(tmp_path):
    require({"layout": "emotion6"}, MEASURED_VA, tmp_path, "dimensional")
    require({"layout": "ser30k"}, STICKERS, tmp_path, "sticker")
    for manifest, capability, role in (({"layout": "folder"}, MEASURED_VA, "dimensional"),
                                       ({"layout": "emotion6"}, STICKERS, "sticker"), ({}, STICKERS, "sticker")):
        with pytest.raises(ValueError) as err:
            require(manifest, capability, tmp_path / "shards", role)
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"{tmp_path / 'shards'}: the {role} dataset must ")
        assert CAPABILITIES[capability] in message and repr(manifest.get("layout")) in message
    with pytest.raises(ValueError, match=r"must carry measured valence/arousal \(layout emotion6\), not layout 'ldl'"):
        require({"layout": "ldl"}, MEASURED_VA, "/x", "dimensional")


def test_detect_layout_recognises_each_demo_folder(tmp_path):
    from datasets_io.demo import DATASETS as DEMO_DATASETS
    from datasets_io.demo import make_demo

    assert tuple(DEMO_SETS) == DEMO_DATASETS  # the registry's demo sets are the ones the generator makes
    roots = make_demo(tmp_path / "demo", images_per_class=1, image_size=16)
    for key, (layout, options) in DEMO_SETS.items():
        assert detect_layout(roots[key]) == layout_of(str(roots[key])) == layout, key
        result = layouts.read_dataset(layout, roots[key], **layouts.ingest_options(layout, {**options, "seed": 0}))
        assert result.records and result.params["layout"] == layout
    ldl = tmp_path / "ldl"
    ldl.mkdir()
    (ldl / "votes.csv").write_text("a.jpg,1,0,0,0,0,0,0,0\n")
    assert detect_layout(ldl) == "ldl"
    with pytest.raises(FileNotFoundError, match="no such dataset folder"):
        detect_layout(tmp_path / "missing")


def test_layout_of_an_ingested_folder_reads_its_manifest(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"schema_version": SCHEMA_VERSION, "layout": "ser30k"}))
    assert layout_of(tmp_path) == "ser30k"
    with pytest.raises(ValueError, match="neither a known dataset name"):
        layout_of(str(tmp_path / "nope"))


def test_format_and_engine_free_modules_do_not_import_ray():
    code = ("import sys, datasets_io\n"
            "assert not {'ray', 'torch', 'pyarrow'} & set(sys.modules), 'import datasets_io imports'\n"
            "import datasets_io.shards, datasets_io.records, datasets_io.layouts, datasets_io.paths\n"
            "assert 'ray' not in sys.modules, 'ray imported'\n"
            "from datasets_io.ingest import ingest\n"
            "assert callable(ingest) and 'ray' in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for module in ("shards", "records", "layouts", "paths", "readers", "lexicon"):
        source = (REPO / "datasets_io" / f"{module}.py").read_text()
        assert "import ray" not in source and "from ray" not in source, module


def test_path_roots_come_from_the_environment(tmp_path, monkeypatch):
    from pipelines import tracking

    monkeypatch.setenv("EMOTION_RAY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EMOTION_RAY_DATA", raising=False)
    monkeypatch.setenv("EMOTION_RAY_CACHE", str(tmp_path / "cache"))
    assert tracking.home_dir is paths.home_dir and paths.home_dir() == tmp_path / "home"
    assert paths.data_dir() == tmp_path / "home" / "data" and paths.cache_dir() == tmp_path / "cache"
    monkeypatch.setenv("EMOTION_RAY_DATA", str(tmp_path / "data"))
    assert paths.data_dir() == tmp_path / "data"
    assert ".jpg" in paths.IMAGE_EXTENSIONS and ".txt" not in paths.IMAGE_EXTENSIONS
