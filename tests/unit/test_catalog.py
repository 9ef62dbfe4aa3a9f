"""Catalog of public sources: every data file loads strictly, and the facts match shared/docs/blip_spec.md."""

from __future__ import annotations

import dataclasses

import pytest

from datasets_manifests.catalog import (
    CATALOG_DIR, CatalogError, Composition, Source, composition, get_source, list_compositions, list_sources,
    load_entry,
)

BLIP_DATA = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/datasets/"
BLIP_RELEASES = ("ccs_filtered.json", "ccs_synthetic_filtered.json", "ccs_synthetic_filtered_large.json",
                 "laion_filtered.json", "laion_synthetic_filtered.json", "laion_synthetic_filtered_large.json")


def test_every_catalog_file_loads_into_frozen_dataclasses():
    names = {s.name for s in list_sources()}
    assert {"coco_karpathy", "flickr30k", "cc3m", "cc12m", "sbu", "visual_genome", "laion115m"} <= names
    assert {c.name for c in list_compositions()} == {"blip-14m", "blip-129m"}
    assert len(list(CATALOG_DIR.glob("*.yaml"))) == len(list_sources()) + len(list_compositions())
    source = get_source("coco_karpathy")
    with pytest.raises(dataclasses.FrozenInstanceError):
        source.name = "x"  # type: ignore[misc]
    assert isinstance(source.annotations, tuple) and isinstance(source, Source)


def test_compositions_match_the_spec():
    small, large = composition("blip-14m"), composition("blip-129m")
    assert isinstance(small, Composition)
    assert set(small.sources) == {"coco_karpathy", "visual_genome", "cc3m", "cc12m", "sbu"}
    assert set(large.sources) == set(small.sources) | {"laion115m"}
    assert (small.counts[0].value, large.counts[0].value) == (14_000_000, 129_000_000)
    assert {a.file for a in large.annotations} >= set(BLIP_RELEASES)
    assert all(a.url == BLIP_DATA + a.file for a in large.annotations if a.file in BLIP_RELEASES)


def test_released_bootstrapped_files_and_karpathy_splits():
    released = [a for name in ("blip_ccs_bootstrapped", "blip_laion_bootstrapped") for a in get_source(name).annotations]
    assert sorted(a.file for a in released) == sorted(BLIP_RELEASES)
    assert {a.flavour for a in released} == {"web_filtered", "synthetic_filtered", "synthetic_filtered_large"}
    coco = get_source("coco_karpathy")
    assert {a.split for a in coco.annotations if a.url} == {"train", "val", "test"}
    assert [c.value for c in coco.counts[:3]] == [113_000, 5_000, 5_000]
    # Per-source web counts are unverified in the spec, and must say so.
    for name in ("cc3m", "cc12m", "sbu", "visual_genome"):
        assert all(count.evidence == "U" for count in get_source(name).counts), name
    assert "unverified" in get_source("sbu").counts[0].describe()


@pytest.mark.parametrize(("text", "message"), [
    ("type: source\nname: x\ntitle: t\ncategory: web\ndescription: d\nimages: i\nannotation_format: f\n"
     "notse: []\n", "unknown key 'notse'"),
    ("type: source\nname: x\ntitle: t\ncategory: cloud\ndescription: d\nimages: i\nannotation_format: f\n",
     "'cloud' is not one of"),
    ("type: source\nname: x\ntitle: t\ncategory: web\ndescription: d\nimages: i\nannotation_format: f\n"
     "counts: [{what: images, value: lots}]\n", "expected an integer"),
    ("type: composition\nname: x\ntitle: t\ndescription: d\n", "missing required key 'sources'"),
    ("type: dataset\nname: x\n", "type: source"),
    ("type: composition\nname: y\ntitle: t\ndescription: d\nsources: []\n", "must match the file name"),
])
def test_loader_rejects_bad_files(tmp_path, text, message):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    with pytest.raises(CatalogError, match=message):
        load_entry(path)


def test_unknown_names_are_errors():
    with pytest.raises(CatalogError, match="unknown source 'imagenet'"):
        get_source("imagenet")
    with pytest.raises(CatalogError, match="known: blip-129m, blip-14m"):
        composition("blip-1b")


def test_visual_genome_records_blips_vg_caption_file():
    # BLIP's configs/pretrain.yaml train_file reads vg_caption.json; the spec gives no URL for it, and says so.
    (vg,) = get_source("visual_genome").annotations
    assert (vg.file, vg.split, vg.url, vg.evidence) == ("vg_caption.json", "train", None, "C")
    assert "no URL" in vg.note
    for name in ("blip-14m", "blip-129m"):
        files = {a.file: a for a in composition(name).annotations}
        assert files["vg_caption.json"].url is None and "coco_karpathy_train.json" in files
