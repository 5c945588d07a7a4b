"""A run's timeline as data (dreambooth_kit.training.lineage): which checkpoints are its history."""

from __future__ import annotations

from dreambooth_kit.training.lineage import Lineage, read_lineage, write_lineage


def test_a_branch_owns_its_history_up_to_the_branch_step_and_nothing_after():
    first = Lineage("a")
    second = first.branch("a", 2)  # resumed from step 2 of "a"
    assert second.id != "a" and second.ancestors == (("a", 2),)
    assert second.owns("a", 2) and not second.owns("a", 4)
    assert second.owns(second.id, 4) and not second.owns("stranger", 1)
    assert second.owns(None, 6)  # written before timelines were recorded: as before, the run's


def test_branching_from_an_ancestor_drops_what_came_after_it():
    a = Lineage("a")
    b = a.branch("a", 4)
    c = b.branch("a", 2)  # back to step 2 of the first timeline
    assert c.ancestors == (("a", 2),) and not c.owns(b.id, 5) and not c.owns("a", 3)
    d = c.branch(c.id, 3)  # from the current timeline: its whole history stays
    assert d.ancestors == (("a", 2), (c.id, 3))


def test_lineage_file_round_trip_and_a_damaged_one_reads_as_none(tmp_path):
    line = Lineage("a").branch("a", 2)
    write_lineage(tmp_path, line)
    assert read_lineage(tmp_path) == line
    (tmp_path / "lineage.json").write_text("[1, 2]")
    assert read_lineage(tmp_path) is None
