"""SpecMoE's draft-length model (engines/draftlen.py): what it tries first, the expected rate it computes from the
measured parts, the choice it makes, and how it re-times."""
import pytest

from engines.draftlen import PROBE_EVERY, DraftLengthModel


def feed(model, gamma, draft_s, rest_s, accept_prob, rows=100):
    """One step of length gamma in which each position keeps accept_prob of the rows that reached it."""
    drafted = [rows] * gamma
    accepted = [round(rows * accept_prob ** j) for j in range(1, gamma + 1)]
    model.record(gamma, gamma * draft_s + rest_s, gamma * draft_s, drafted, accepted)


def test_every_candidate_is_timed_first_largest_first():
    model = DraftLengthModel([0, 2, 4])
    seen = []
    for _ in range(3):
        gamma = model.choose()
        seen.append(gamma)
        feed(model, gamma, 0.001, 0.01, 0.9)
    assert seen == [4, 2, 0]


def test_expected_rate_is_accepted_length_over_draft_and_verify_time():
    model = DraftLengthModel([0, 2, 4])
    model.record(4, 0.004 + 0.02, 0.004, [10] * 4, [8, 6, 4, 2])  # u_j = 0.8, 0.6, 0.4, 0.2
    model.record(2, 0.002 + 0.015, 0.002, [10, 10], [8, 6])
    model.record(0, 0.012, 0.0, [], [])
    assert model.expected_tokens(4) == pytest.approx(1 + 0.8 + 0.6 + 0.4 + 0.2)
    assert model.expected_tokens(2) == pytest.approx(1 + 0.8 + 0.6)
    assert model.rate(4) == pytest.approx(3.0 / (4 * 0.001 + 0.02))
    assert model.rate(2) == pytest.approx(2.4 / (2 * 0.001 + 0.015))
    assert model.rate(0) == pytest.approx(1 / 0.012)
    assert model.best() == 2  # 141 tokens/s per row against 125 (gamma 4) and 83 (plain)


@pytest.mark.parametrize("accept,draft_s,rest_s,expected", [
    (0.99, 0.001, 0.010, 10),  # drafts almost always right and cheap: the longest
    (0.30, 0.001, 0.010, 1),  # mostly wrong: short
    (0.30, 0.010, 0.005, 0),  # drafts cost more than they bring: plain steps (speculation off)
])
def test_the_choice_follows_acceptance_and_cost(accept, draft_s, rest_s, expected):
    model = DraftLengthModel([0, 1, 2, 4, 6, 8, 10])
    for _ in range(40):
        gamma = model.choose()
        feed(model, gamma, draft_s, rest_s * (1 + 0.05 * gamma), accept)
    assert model.best() == expected


def test_neighbours_of_the_best_are_timed_again_every_probe_every_steps():
    model = DraftLengthModel([1, 2, 4, 6])
    for _ in range(4 * PROBE_EVERY):
        gamma = model.choose()
        feed(model, gamma, 0.001, 0.010, 0.7)
    best = model.best()
    picks = []
    for _ in range(2 * PROBE_EVERY):
        picks.append(model.choose())
        feed(model, picks[-1], 0.001, 0.010, 0.7)
    probes = [g for g in picks if g != best]
    assert 1 <= len(probes) <= 2 and all(abs(model.candidates.index(g) - model.candidates.index(best)) == 1
                                         for g in probes)


def test_a_fixed_gamma_is_always_chosen():
    model = DraftLengthModel([4])
    for _ in range(2 * PROBE_EVERY + 1):
        assert model.choose() == 4
        feed(model, 4, 0.001, 0.01, 0.5)
