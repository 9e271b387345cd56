"""The compile plan (sparsescale/plan.py) on hand-worked jobs: a plain run, a stack with a shared
prefix, block-sparse phases, and resumes inside each segment."""

from sparsescale.plan import Segment, compile_plan


def test_one_run_is_one_segment():
    assert compile_plan(0, 100, 1) == [Segment(0, 100, (0,), (0,))]
    assert compile_plan(40, 100, 1) == [Segment(40, 100, (0,), (0,))]
    assert compile_plan(100, 100, 1) == []  # finished: nothing to train


def test_shared_prefix_trains_one_variant_per_seed_then_forks():
    # members 0, 1 share seed A (rep 0), member 2 has seed B (rep 2): slots [0, 0, 1]
    prefix = (25, [0, 2], [0, 0, 1])
    assert compile_plan(0, 100, 3, prefix) == [
        Segment(0, 25, trained=(0, 2), slots=(0, 0, 1)),
        Segment(25, 100, trained=(0, 1, 2), slots=(0, 1, 2)),
    ]
    assert compile_plan(0, 100, 3, prefix)[0].shared
    assert compile_plan(10, 100, 3, prefix)[0] == Segment(10, 25, (0, 2), (0, 0, 1))
    assert compile_plan(25, 100, 3, prefix) == [Segment(25, 100, (0, 1, 2), (0, 1, 2))]


def test_block_phases_cut_segments_and_end_the_prefix():
    prefix = (25, [0], [0, 0])
    assert compile_plan(0, 100, 2, prefix, block_steps=[60, 75]) == [
        Segment(0, 25, (0,), (0, 0), 0),
        Segment(25, 60, (0, 1), (0, 1), 0),
        Segment(60, 75, (0, 1), (0, 1), 1),
        Segment(75, 100, (0, 1), (0, 1), 2),
    ]
    # a switch before the prefix would end ends it there (the block step trains every variant)
    assert compile_plan(0, 100, 2, prefix, block_steps=[20]) == [
        Segment(0, 20, (0,), (0, 0), 0),
        Segment(20, 100, (0, 1), (0, 1), 1),
    ]
    # resumed past a switch: that phase is in force from the start
    assert compile_plan(70, 100, 2, prefix, block_steps=[60, 75]) == [
        Segment(70, 75, (0, 1), (0, 1), 1),
        Segment(75, 100, (0, 1), (0, 1), 2),
    ]


def test_no_sharing_means_no_prefix():
    assert compile_plan(0, 50, 2, (0, [], [])) == [Segment(0, 50, (0, 1), (0, 1))]
    assert compile_plan(0, 50, 2, (30, [], []), block_steps=[40]) == [
        Segment(0, 40, (0, 1), (0, 1), 0),
        Segment(40, 50, (0, 1), (0, 1), 1),
    ]
