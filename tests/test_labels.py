"""Figure labels are wrapped, never cut (issue 12: legends and titles showed `pretr...`, `mni_coronal_058.pn`)."""

from __future__ import annotations

import pytest

from meddino.viz.labels import wrap_label


@pytest.mark.parametrize(("label", "width", "lines"), [
    ("mni_coronal_058.png", 18, ["mni_coronal_", "058.png"]),
    ("pretrain_dinov2_tiny_continued [linear, frozen]", 24,
     ["pretrain_dinov2_tiny_", "continued [linear,", "frozen]"]),
    ("a" * 40, 18, ["a" * 18, "a" * 18, "a" * 4]),
    ("short", 18, ["short"]),
    ("runs/demo/pretrain/teacher_backbone_000200", 20, ["runs/demo/pretrain/", "teacher_backbone_", "000200"]),
])
def test_labels_wrap_on_separators_and_lose_nothing(label, width, lines):
    wrapped = wrap_label(label, width)
    assert wrapped.split("\n") == lines
    assert all(len(line) <= width for line in lines)
    assert "".join(wrapped.split("\n")).replace(" ", "") == label.replace(" ", "")  # nothing cut


def test_two_labels_with_a_long_common_prefix_stay_different():
    a, b = "pretrain_continued_run_a", "pretrain_continued_run_b"
    assert wrap_label(a, 10) != wrap_label(b, 10)
