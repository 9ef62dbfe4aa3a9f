"""CapFilt quality measures against a hand-built ground truth (pipelines/tasks/capfilt_quality.py)."""

from __future__ import annotations

from pipelines.tasks.capfilt_quality import described_objects, measure, names_scene


def test_names_scene_judges_the_object_not_the_background():
    # (right shape, right colour, one object with both)
    assert names_scene("two small red circles on a grey background", "circle", "red") == (True, True, True)
    assert names_scene("a red circle on a blue background", "circle", "blue") == (True, False, False)
    assert names_scene("a white circle drawn on black", "circle", "black") == (True, False, False)
    assert names_scene("a yellow star against a light blue backdrop.", "star", "blue") == (True, False, False)
    assert names_scene("Red circle (small) on blue!", "circle", "blue") == (True, False, False)
    assert names_scene("a large circle in red - simple geometric art", "circle", "red") == (True, True, True)
    assert names_scene("illustration: three green squares, white background", "square", "green") == (True, True, True)
    # Right shape and right colour, but on different objects.
    assert names_scene("a white triangle and a green square", "triangle", "green") == (True, True, False)
    assert names_scene("a light blue circle", "circle", "blue") == (True, False, False)
    assert names_scene("a blue square", "circle", "red") == (False, False, False)
    assert described_objects("a red thing on a blue background") == []


def test_measure_counts_on_a_hand_built_truth_table():
    scenes = {  # key: (shape, colour, is_noisy, bad_kind)
        "k1": ("circle", "red", False, None), "k2": ("square", "blue", True, None),
        "k3": ("star", "green", False, None), "k4": ("diamond", "white", False, "empty_caption"),
        "k5": ("circle", "black", False, None),
    }  # fmt: skip
    truth = [{"path": f"images/{key}.jpg", "shape": shape, "colour": colour, "is_noisy": noisy, "bad_kind": bad}
             for key, (shape, colour, noisy, bad) in scenes.items()]  # fmt: skip
    truth.append({**truth[0], "shape": "star"})  # a duplicate URL: the first record owns it
    texts = [  # (key, source, text, kept)
        ("k1", "web", "a red circle", True), ("k1", "synthetic", "a red circle on a blue background", True),
        ("k2", "web", "unrelated", True), ("k2", "synthetic", "a red square on a blue background", False),
        ("k3", "web", "a green star", False), ("k3", "synthetic", "a green circle and a red star", True),
        ("k4", "web", "", False), ("k4", "synthetic", "a white diamond", True),
        ("k5", "web", "a black circle", False), ("k5", "synthetic", "x", False),
    ]  # fmt: skip
    text_rows = [{"key": k, "source": s, "text": t, "kept": kept,
                  "drop_reason": None if kept else "itm_below_threshold"} for k, s, t, kept in texts]  # fmt: skip
    text_rows[-2:] = [dict(row, drop_reason="decode_error") for row in text_rows[-2:]]  # k5: image undecodable
    index_rows = [
        {"key": "k1", "caption": "a red circle", "caption_source": "web", "status": "ok"},
        {"key": "k2", "caption": "unrelated", "caption_source": "web", "status": "ok"},
        {"key": "k3", "caption": "a green circle and a red star", "caption_source": "synthetic", "status": "ok"},
        {"key": "k4", "caption": "a white diamond", "caption_source": "synthetic", "status": "ok"},
        {"key": "k5", "caption": None, "caption_source": None, "status": "dropped"},
    ]
    for row in index_rows:
        row["url"] = f"http://host:1/images/{row['key']}.jpg"
    quality = measure(truth, text_rows, index_rows)
    assert quality["samples_matched"] == 4
    # Web: k1 clean kept, k2 noisy kept, k3 clean dropped, k4 (empty caption) not a description, dropped.
    assert quality["web_filter"] == {"kept_clean": 1, "kept_noisy": 1, "dropped_clean": 1, "dropped_noisy": 1,
                                     "precision": 0.5, "recall": 0.5}  # fmt: skip
    # Synthetic: k1 both; k2 shape only (red is the object, blue the background); k3 shape and colour on
    # different objects; k4 both.
    assert quality["synthetic"] == {"total": 4, "shape": 4, "colour": 3, "both": 2, "right_shape": 1.0,
                                    "right_colour": 0.75, "right_shape_and_colour": 0.5}  # fmt: skip
    assert quality["clean_fraction_before"] == 0.5  # k1, k3 of k1..k4
    assert quality["clean_fraction_after"] == 0.6  # kept: k1 web+syn (true), k2 web (false), k3 syn (false), k4 syn
    assert quality["training_caption_clean_fraction"] == 0.5  # k1 and k4 of the four kept samples
