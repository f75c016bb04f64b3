"""onepass.benchmark, fast unit tests (seconds, CPU only, no timing asserted): the planning of
rounds (onepass.benchmark.timing)."""

from __future__ import annotations


from onepass import benchmark as b


def test_plan_rounds():
    assert b.plan_rounds(100.0, 10, 10.0, 3) == 10  # 10 x 0.1 s fits in 10 s
    assert b.plan_rounds(3000.0, 10, 10.0, 3) == 3  # 3 s a step: 3 rounds, the minimum
    assert b.plan_rounds(2000.0, 10, 10.0, 3) == 5
    assert b.plan_rounds(5000.0, 2, 1.0, 3) == 2  # never more than rounds
    assert b.plan_rounds(None, 10, 10.0, 3) == 10 and b.plan_rounds(5000.0, 10, None, 3) == 10
    for planned in range(1, 11):
        taken = [r for r in range(10) if b._takes_part(r, planned, 10)]
        assert len(taken) == planned
        if planned > 1:  # spread over the run, not bunched at the start
            assert taken[-1] >= 10 - 10 // planned
