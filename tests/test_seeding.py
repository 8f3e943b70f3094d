"""One seed rule for every random stream: streams of different purposes never coincide, and a row's sampling
uniforms depend on its global row only (not on the slice of rows it is computed with)."""

import torch

from opd_lightning.seeding import derive_seed, make_generator, row_uniforms


def test_streams_of_different_purposes_steps_and_ranks_are_distinct():
    seeds = {derive_seed(0, purpose, step, rank) for purpose in ("data", "grpo_rollout", "opd_rollout")
             for step in range(50) for rank in range(4)}  # fmt: skip
    assert len(seeds) == 3 * 50 * 4
    assert all(0 <= s < 2**63 for s in seeds)
    # the arithmetic rule this replaces, (seed * 1_000_003 + step) * 1_009 + rank, aliased neighbours
    assert derive_seed(0, "data", 1, 0) != derive_seed(0, "data", 0, 1_009)


def test_seeds_are_stable_across_runs_and_processes():
    # a pure function of its arguments (no Python hash randomisation): resumes and ranks agree
    assert derive_seed(3, "data", 7) == derive_seed(3, "data", 7) == 4_684_893_555_084_005_321
    a = torch.rand(4, generator=make_generator(3, "data", 7))
    assert torch.equal(a, torch.rand(4, generator=make_generator(3, "data", 7)))


def test_a_rows_uniforms_do_not_depend_on_the_slice_it_is_drawn_in():
    whole = row_uniforms(0, "opd_rollout", 5, range(0, 8), width=6)  # [8, 6]
    halves = torch.cat([row_uniforms(0, "opd_rollout", 5, range(0, 4), 6),
                        row_uniforms(0, "opd_rollout", 5, range(4, 8), 6)])  # fmt: skip
    assert torch.equal(whole, halves)
    assert ((whole >= 0) & (whole < 1)).all() and whole.dtype == torch.float32
    assert not torch.equal(whole, row_uniforms(0, "opd_rollout", 6, range(0, 8), 6)), "another step"
    assert not torch.equal(whole, row_uniforms(0, "grpo_rollout", 5, range(0, 8), 6)), "another purpose"
