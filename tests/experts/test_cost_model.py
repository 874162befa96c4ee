"""The expert cost model and the intra-layer schedule (torch-free)."""

from __future__ import annotations

import itertools
import random

import pytest

from experts.cost_model import ExpertCostModel, LinearTime, layer_time, plan_layer

GPU = ExpertCostModel(expert_bytes=1000, transfer_s=10.0, fast=LinearTime(1.0, 0.01),
                      slow=LinearTime(4.0, 1.0), overlap=True, fast_device="cuda:0")


def test_fit_recovers_a_line_and_refuses_one_token_count():
    fit = LinearTime.fit([(t, 2.0 + 0.5 * t) for t in (1, 2, 4, 8)])
    assert fit.fixed_s == pytest.approx(2.0) and fit.per_token_s == pytest.approx(0.5)
    assert LinearTime.fit([(1, 3.0), (2, 1.0)]).per_token_s == 0.0  # never a negative slope
    with pytest.raises(ValueError, match="two token counts"):
        LinearTime.fit([(4, 1.0), (4, 2.0)])


def test_overlap_takes_the_busiest_resource_and_one_processor_adds():
    tokens = {0: 1, 1: 1, 2: 1}
    # resident 0 computes (1.01) while 1 is in flight (10), then 1 computes; 2 runs on the CPU (5)
    assert layer_time(tokens, {0}, [1], [2], GPU) == pytest.approx(10 + 1.01)
    serial = ExpertCostModel(1000, 10.0, GPU.fast, GPU.slow, overlap=False)
    assert layer_time(tokens, {0}, [1], [2], serial) == pytest.approx(1.01 + 11.01 + 5.0)


def test_few_tokens_compute_on_the_cpu_and_many_are_loaded():
    plan = plan_layer({0: 1, 1: 1, 2: 64}, resident=set(), model=GPU)
    assert plan.load == (2,) and set(plan.slow) == {0, 1}  # 64 tokens: 68 s on the CPU, 11.6 s loaded
    assert plan.time_s == pytest.approx(layer_time({0: 1, 1: 1, 2: 64}, set(), [2], [0, 1], GPU))
    assert plan_layer({0: 64, 1: 64}, set(), GPU, max_loads=1).load == (0,)  # only one free row


def test_resident_experts_are_never_planned():
    plan = plan_layer({3: 5, 4: 1}, resident={3, 4}, model=GPU)
    assert plan.load == () and plan.slow == () and plan.time_s == pytest.approx(2 * 1.0 + 6 * 0.01)


def test_plan_is_close_to_the_best_assignment():
    rng = random.Random(0)
    for _ in range(200):
        model = ExpertCostModel(1000, rng.uniform(0.1, 10), LinearTime(rng.uniform(0, 1), rng.uniform(0, 0.1)),
                                LinearTime(rng.uniform(0, 5), rng.uniform(0, 1)), overlap=rng.random() < 0.7)
        tokens = {e: rng.choice([1, 1, 2, 3, 8, 30]) for e in rng.sample(range(16), rng.randint(1, 6))}
        resident = {e for e in tokens if rng.random() < 0.3}
        missing = [e for e in tokens if e not in resident]
        best = min(layer_time(tokens, resident, [e for e, c in zip(missing, pick) if c],
                              [e for e, c in zip(missing, pick) if not c], model)
                   for pick in itertools.product((0, 1), repeat=len(missing)))
        plan = plan_layer(tokens, resident, model)
        assert sorted((*plan.load, *plan.slow)) == sorted(missing)
        assert plan.time_s <= 1.35 * best + 1e-12
        assert plan.time_s <= 1.05 * min(layer_time(tokens, resident, missing, [], model),
                                         layer_time(tokens, resident, [], missing, model)) + 1e-12


def test_scaling_and_round_trip():
    big = GPU.scaled(4000)
    assert big.transfer_s == pytest.approx(40.0) and big.slow.at(1) == pytest.approx(20.0)
    assert big.transfer_gbps == pytest.approx(GPU.transfer_gbps)
    assert ExpertCostModel.from_dict(GPU.as_dict()) == GPU
    with pytest.raises(ValueError, match="moe-serve calibrate"):
        ExpertCostModel.from_dict({"expert_bytes": 10})
    text = GPU.describe()
    assert "10,000,000.0 us" in text and "worth loading from 8 tokens" in text
