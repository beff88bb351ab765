"""Lexicon: scale converters, anchors, NRC-VAD files, unknown names, weighted means."""
from __future__ import annotations

import numpy as np
import pytest

from datasets_io.lexicon import (ANCHORS_NRC, CATEGORY_SETS, Lexicon, canonical_to_sam,
                                 nrc_to_canonical, normalize_dist, read_table, resolve_categories,
                                 sam_to_canonical)


def test_converters_map_scale_ends_and_round_trip():
    assert (nrc_to_canonical(0.0), nrc_to_canonical(0.5), nrc_to_canonical(1.0)) == (-1.0, 0.0, 1.0)
    assert (sam_to_canonical(1.0), sam_to_canonical(5.0), sam_to_canonical(9.0)) == (-1.0, 0.0, 1.0)
    x = np.linspace(-1, 1, 9)
    np.testing.assert_allclose(nrc_to_canonical((x + 1) / 2), x)
    np.testing.assert_allclose(sam_to_canonical(canonical_to_sam(x)), x)
    np.testing.assert_allclose(canonical_to_sam(x), np.linspace(1, 9, 9))


def test_builtin_anchor_aliases_and_case():
    lexicon = Lexicon.builtin()
    assert lexicon.va("anger") == pytest.approx((2 * 0.167 - 1, 2 * 0.865 - 1))
    assert lexicon.va("Happiness") == lexicon.va("JOY") == pytest.approx((0.96, 0.648))
    anchors = lexicon.va_many(CATEGORY_SETS["SER30K"])
    assert anchors.shape == (7, 2)
    assert np.all(np.abs(anchors) <= 1)
    for names in CATEGORY_SETS.values():
        lexicon.check(names)  # every built-in set is covered by the anchors


def test_unknown_category_lists_known_names_and_suggests_a_file():
    with pytest.raises(ValueError, match="unknown emotion category 'boredom'") as err:
        Lexicon.builtin().va("boredom")
    message = str(err.value)
    assert "amusement" in message and "surprise" in message and "lexicon file" in message
    assert "\n" not in message


def test_unknown_category_message_stays_short_for_a_full_lexicon():
    lexicon = Lexicon({f"word{i:03d}": (0.5, 0.5) for i in range(500)})
    with pytest.raises(ValueError, match=r"word039, \.\.\. \(500 in all\)") as err:
        lexicon.check(["anger"])
    assert len(str(err.value)) < 1000


def test_normalize_dist_rejects_what_is_no_distribution():
    np.testing.assert_allclose(normalize_dist([3, 1]), [0.75, 0.25])
    with pytest.raises(ValueError, match="all weights are zero"):
        normalize_dist([0, 0])
    with pytest.raises(ValueError, match="non-negative"):
        normalize_dist([1, -1])


def test_from_file_with_header_matches_the_cited_table(nrc_vad_sample):
    lexicon = Lexicon.from_file(nrc_vad_sample)
    words = [fields[0] for _, fields in read_table(nrc_vad_sample)[1:]]
    assert len(words) == 11
    for word in words:
        assert lexicon.va(word) == pytest.approx(tuple(nrc_to_canonical(x) for x in ANCHORS_NRC[word]))


def test_from_file_without_header_extends_and_overrides(tmp_path):
    path = tmp_path / "lex.txt"
    path.write_text("Serenity\t0.900\t0.100\t0.500\nanger\t0.100\t0.900\t0.600\n")
    lexicon = Lexicon.from_file(path)
    assert lexicon.va("serenity") == pytest.approx((0.8, -0.8))
    assert lexicon.va("anger") == pytest.approx((-0.8, 0.8))
    assert lexicon.va("awe") == Lexicon.builtin().va("awe")
    assert str(path) in lexicon.source


@pytest.mark.parametrize("rows, problem", [
    ("word\tvalence\tarousal\tdominance\ncalm\t0.5\t0.2\t0.4\nodd\thigh\t0.3\t0.1\n", "'high' is not a number"),
    ("calm\t0.5\t0.2\t0.4\nodd\t1.5\t0.3\t0.1\n", "outside the NRC-VAD v1 range"),
    ("calm\t0.5\t0.2\t0.4\nodd\t0.5\n", "got 2 field"),
])
def test_bad_lexicon_rows_name_file_and_line(tmp_path, rows, problem):
    path = tmp_path / "lex.tsv"
    path.write_text(rows)
    bad_line = len(rows.splitlines())
    with pytest.raises(ValueError, match=problem) as err:
        Lexicon.from_file(path)
    assert str(err.value).startswith(f"{path}:{bad_line}:")


def test_resolve_categories():
    assert resolve_categories("fi") == CATEGORY_SETS["FI"]
    assert resolve_categories(["Positive", " negative "]) == ["positive", "negative"]
    with pytest.raises(ValueError, match="built-in sets: FI, Flickr"):
        resolve_categories("FII")
    with pytest.raises(ValueError, match="repeat"):
        resolve_categories(["anger", "Anger"])
