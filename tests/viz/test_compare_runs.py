"""The pictures of Compare runs, read back: steps matched by noise level (not by step index), the
x0 grid's cells, the differences on one scale, every run's dots on the sigma chart."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sd_parts.schedulers import load_scheduler
from viz import compare_runs
from viz.heatmap import colormap_table

RNG = np.random.default_rng(0)


def levels(kind: str, steps: int) -> list[float]:
    sampler = load_scheduler(None, kind=kind)
    sampler.set_timesteps(steps)
    return [sampler.noise_level(t) for t in sampler.timesteps]


def test_runs_of_different_lengths_are_matched_by_noise_level_not_by_step():
    short, long = levels("lcm", 4), levels("euler", 20)
    targets = compare_runs.matched_levels([short, long])
    assert len(targets) == compare_runs.LEVELS_SHOWN
    # within both runs' ranges, high to low, evenly spaced in log sigma
    assert max(targets) == pytest.approx(min(max(short), max(long)))
    assert min(targets) == pytest.approx(max(min(short), min(long)))
    assert np.allclose(np.diff(np.log(targets)), np.diff(np.log(targets))[0])
    picks_short, picks_long = (compare_runs.nearest_steps(run, targets) for run in (short, long))
    assert picks_short != picks_long  # the same noise level is a different step in each
    for run, picks in ((short, picks_short), (long, picks_long)):
        for target, pick in zip(targets, picks, strict=True):
            distance = abs(math.log(run[pick]) - math.log(target))
            assert all(distance <= abs(math.log(s) - math.log(target)) for s in run)


def test_a_one_step_run_shares_one_level():
    ddim = levels("ddim", 10)  # leading spacing: its first step is at sigma 8.4, not 14.6
    assert compare_runs.matched_levels([[14.6], ddim]) == [max(ddim)]
    with pytest.raises(ValueError, match="at least one noise level"):
        compare_runs.matched_levels([[], [1.0]])


def test_the_x0_grid_holds_each_runs_thumbnails_in_order():
    pictures = [RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    rows = [("run 1: Euler", [("step 1", pictures[0]), ("step 4", pictures[1])]),
            ("run 2: LCM", [("step 1", pictures[2]), ("step 2", None)])]
    grid = compare_runs.x0_grid([10.0, 1.0], rows, side=32)
    assert len(grid.maps) == 4
    shown = [*pictures[:3], None]
    for box, picture in zip(grid.maps, shown, strict=True):
        cells = box.cells(grid.pixels)
        if picture is None:  # a level the run did not reach: a grey square
            assert (cells == compare_runs.MISSING).all()
        else:
            np.testing.assert_array_equal(cells, compare_runs.thumbnail(picture, 32))
    # the columns line up: the same level sits at the same x in every row
    assert grid.maps[0].left == grid.maps[2].left and grid.maps[1].left == grid.maps[3].left
    with pytest.raises(ValueError, match="one cell per target level"):
        compare_runs.x0_grid([10.0], rows)


def test_differences_are_drawn_on_one_scale_against_run_1():
    first = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    darker = (first // 2).astype(np.uint8)
    view = compare_runs.differences_view([("run 1", first), ("run 2", first.copy()),
                                          ("run 3", darker)])
    assert len(view.maps) == 2
    same, changed = (box.cells(view.pixels) for box in view.maps)
    table = colormap_table("magma")
    assert (same == table[0]).all()  # identical images: the scale's zero everywhere
    assert not (changed == table[0]).all()
    assert compare_runs.mean_difference(first, darker) == pytest.approx(
        np.abs(first.astype(float) - darker).mean())
    assert compare_runs.differences_view([("run 1", first)]) is None


def test_the_sigma_chart_draws_every_run_even_on_the_same_schedule():
    schedule = levels("euler", 6)
    schedules = [schedule, schedule, levels("lcm", 4)]
    chart = compare_runs.sigma_chart(schedules, ["run 1", "run 2", "run 3"])
    frame = compare_runs.SigmaChart.for_schedules(schedules)
    assert chart.shape == (frame.height, frame.width, 3)
    for run, sigmas in enumerate(schedules):
        # the run's ring: outside the next run's dot (drawn over it), inside its own edge
        inner = frame.marker_radius(run + 1, 3) if run + 1 < len(schedules) else 0
        offset = (inner + frame.marker_radius(run, 3)) // 2
        for step, sigma in enumerate(sigmas, start=1):
            x, y = frame.point(step, sigma)
            assert tuple(chart[round(y), round(x) + offset]) == compare_runs.RUN_COLOURS[run]
    with pytest.raises(ValueError, match="each with a label"):
        compare_runs.sigma_chart(schedules, ["one label"])


def test_a_table_row_says_evaluations_and_time_per_evaluation():
    assert compare_runs.table_row(1, "Heun", 3, 5, 2.0, 4.25) == [2, "Heun", 3, 5, 2.0, 0.4,
                                                                  4.25]
    assert compare_runs.table_row(0, "DDIM", 3, 0, 0.5, None)[5:] == ["", ""]
