"""The synthetic multi-modal face generator: deterministic, complementary conditions, folder round trip."""

import json

import numpy as np
import pytest
import torch

from collab_core.errors import ConfigError
from collab_core.masks import CLASS_NAMES, load_mask
from collab_core.training.data import from_folder, labels_to_onehot_batch, synthetic
from collab_core.training.synthetic import ATTRIBUTES, SyntheticFaces, caption_for, face_sample, write_dataset

C = {n: i for i, n in enumerate(CLASS_NAMES)}


def test_same_key_same_sample_and_splits_differ():
    a, b = face_sample(7, seed=3), face_sample(7, seed=3)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels) and a.caption == b.caption
    # the sequence view gives the same sample whatever the order of access
    ds = SyntheticFaces(10, seed=3)
    assert np.array_equal(ds[7].image, a.image) and np.array_equal(list(ds)[7].labels, a.labels)
    other = [face_sample(7, seed=3, split="test"), face_sample(7, seed=4), face_sample(8, seed=3)]
    assert all(not np.array_equal(o.labels, a.labels) for o in other)


def test_pictures_and_label_maps_have_the_required_classes():
    required = ["background", "skin", "l_eye", "r_eye", "l_brow", "r_brow", "hair", "u_lip", "l_lip", "nose",
                "cloth"]
    for i in range(12):
        s = face_sample(i, size=64)
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        assert s.labels.shape == (64, 64) and 0 <= s.labels.min() and s.labels.max() < 19
        present = set(np.unique(s.labels).tolist())
        missing = [c for c in required if C[c] not in present]
        assert not missing, f"sample {i} lacks {missing}"
    # the generator also makes the optional parts: an open mouth, glasses, ears
    seen = set()
    for i in range(40):
        seen |= set(np.unique(face_sample(i, size=64).labels).tolist())
    assert {C["mouth"], C["eye_g"], C["l_ear"], C["r_ear"], C["neck"]} <= seen


def test_caption_carries_what_the_mask_cannot_show():
    s = face_sample(5, size=64)
    for attr, value in s.attributes.items():
        assert value in s.caption
    # the picture shows the captioned colours where the label map says hair / shirt
    for attr, cls in (("hair", "hair"), ("shirt", "cloth")):
        px = s.image[s.labels == C[cls]].astype(float)
        want = np.array(ATTRIBUTES[attr][s.attributes[attr]], float)
        others = [np.array(v, float) for k, v in ATTRIBUTES[attr].items() if k != s.attributes[attr]]
        d = np.linalg.norm(np.median(px, 0) - want)
        assert d < min(np.linalg.norm(np.median(px, 0) - o) for o in others)
    # the label map does not depend on the attributes: change only the colours and age, geometry stays
    ages = {face_sample(i).attributes["age"] for i in range(20)}
    assert ages == {"young", "old"}
    assert caption_for({"hair": "red", "skin": "tan", "shirt": "blue", "age": "old"}, 1).startswith("An old person")


def test_bad_requests_are_refused():
    with pytest.raises(ConfigError, match="split"):
        face_sample(0, split="holdout")
    with pytest.raises(ConfigError, match="at least one"):
        SyntheticFaces(0)
    with pytest.raises(ConfigError, match="size"):
        face_sample(0, size=8)


def test_folder_round_trip_equals_the_generator(tmp_path):
    write_dataset(tmp_path / "ds", 4, seed=2, size=32)
    rows = [json.loads(l) for l in (tmp_path / "ds" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and set(rows[0]) == {"image", "mask", "text", "attributes"}
    got = from_folder(tmp_path / "ds", size=32)
    want = synthetic(4, seed=2, size=32)
    assert torch.equal(got.images, want.images)
    assert got.column("text").captions == want.column("text").captions
    assert torch.equal(got.column("mask").labels, want.column("mask").labels)
    # the mask PNGs are the reference's format: indexed, palette = class colours
    assert np.array_equal(load_mask(tmp_path / "ds" / rows[0]["mask"]), face_sample(0, seed=2, size=32).labels)


def test_folder_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="metadata.jsonl"):
        from_folder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"image": "nope.png", "text": "x"}\n')
    with pytest.raises(ConfigError, match="does not exist"):
        from_folder(tmp_path)


def test_onehot_batch_matches_the_reference_layout():
    labels = synthetic(2, size=64).column("mask").labels
    oh = labels_to_onehot_batch(labels, 32)
    assert oh.shape == (2, 19, 1024)
    assert torch.equal(oh.sum(1), torch.ones(2, 1024))
    assert torch.equal(oh[0].argmax(0).view(32, 32), labels[0].long())
