"""The report's per-class table: which TAL classes stage 1 never trained on is marked, by name."""

from __future__ import annotations

from pipelines.stages.report import per_class_lines, untaught_classes


def report_with(stage1_classes: list[str]) -> dict:
    aps = {"bounce": 0.5, "rotate": 0.25, "grow": 0.75}
    return {"baseline": {"per_class_average_AP": aps}, "lofi": {"per_class_average_AP": aps},
            "stage1_classes": stage1_classes}


def test_classes_missing_from_stage1_are_starred_with_a_footnote():
    lines = per_class_lines(report_with(["bounce", "grow", "still"]))
    header = lines[0].split()
    assert "rotate*" in header and "bounce" in header and "grow" in header
    assert lines[1].split()[-3:] == ["50.00%", "25.00%", "75.00%"]
    assert lines[-1].startswith("* a class stage 1 was not trained on")


def test_no_mark_when_stage1_shares_every_name_or_none():
    for classes in (["bounce", "rotate", "grow"], ["abseiling", "archery"], []):
        lines = per_class_lines(report_with(classes))
        assert "*" not in lines[0] and len(lines) == 3
    assert untaught_classes(["a", "b"], ["b", "c"]) == {"a"}
