"""A guard on what sharing costs (not the benchmark, bench/quality/evaluate.py is): the trained role adapters of
bench/quality/ answer a small slice of held-out ledgers through stock SGLang and through --forkkv in its default
mode; the default mode must not lose more than 2 points of accuracy against stock's exact per-adapter cache."""

import importlib.util
from pathlib import Path

import pytest

from _server import running_server

QUALITY = Path(__file__).resolve().parents[1] / "bench" / "quality"
LEDGERS, TOKENS = 8, 800  # 24 cases: every case counts 4.2 points, so any lost answer fails the guard


@pytest.fixture(scope="module")
def evaluate():
    spec = importlib.util.spec_from_file_location("quality_evaluate", QUALITY / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def answers(evaluate, model_dir, *flags, adapters="adapters", system="guard") -> list[dict]:
    """The three roles' replies on the guard's ledgers; ``system`` as evaluate.py names it (only whether the
    adapter-free model prefills each ledger first is read from it here)."""
    paths = [f"{role}={QUALITY / adapters / role}" for role in evaluate.tasks.ROLES]
    with running_server(model_dir, "--enable-lora", "--max-loras-per-batch", "4", "--lora-paths", *paths,
                        *flags) as url:
        return evaluate.run_system(url, system, [TOKENS], LEDGERS, ["forward"], vocab=0)


def accuracy(rows) -> float:
    return sum(r["correct"] for r in rows) / len(rows)


@pytest.fixture(scope="module")
def runs(evaluate, model_dir):
    stock, forkkv = answers(evaluate, model_dir), answers(evaluate, model_dir, "--forkkv")
    assert len(stock) == len(forkkv) == LEDGERS * len(evaluate.tasks.ROLES)
    exact = accuracy(stock)
    shared = accuracy(forkkv)
    agree = sum(a["output_ids"] == b["output_ids"] for a, b in zip(stock, forkkv)) / len(stock)
    print(f"accuracy: stock {exact:.3f}, forkkv default {shared:.3f}; greedy agreement {agree:.3f}")
    return stock, forkkv


def test_first_agent_exact_and_followers_share(runs):
    stock, forkkv = runs
    # the adapters learned their roles (else the comparison says nothing)
    assert accuracy(stock) >= 0.6
    for s, f in zip(stock, forkkv):
        if f["position"] == 0:  # the agent that prefilled its ledger answers exactly as stock
            assert f["output_ids"] == s["output_ids"]
        else:  # the others really read its base entries (else the guard below guards nothing)
            assert f["cached_tokens"] >= TOKENS - 100


@pytest.mark.xfail(strict=True, reason="measured 2026-11-25: with these trained adapters the default mode (recompute) "
                   "loses 21 to 53 points of accuracy against stock (bench/RESULTS.md, ## Quality); strict, so the "
                   "day the gap closes this test fails until the marker goes")
def test_default_mode_within_two_points_of_exact(runs):
    stock, forkkv = runs
    exact = accuracy(stock)
    shared = accuracy(forkkv)
    assert shared >= exact - 0.02


# The sharing-aware adapters (bench/quality/adapters-aware) in the mode they were trained for: the adapter-free model
# writes each ledger's base (a request without an adapter prefills it first) and layers 15 to 29 stay per adapter.
AWARE_SYSTEM = "base-model+private:last:15"
AWARE_FLAGS = ("--forkkv", "--forkkv-private-layers", "last:15")


@pytest.fixture(scope="module")
def aware_runs(evaluate, model_dir):
    stock = answers(evaluate, model_dir, adapters="adapters-aware")
    shared = answers(evaluate, model_dir, *AWARE_FLAGS, adapters="adapters-aware", system=AWARE_SYSTEM)
    print(f"sharing-aware: stock {accuracy(stock):.3f}, {AWARE_SYSTEM} {accuracy(shared):.3f}")
    return stock, shared


def test_sharing_aware_adapters_within_two_points(aware_runs):
    stock, shared = aware_runs
    # every agent read the adapter-free model's ledger (else this guards the exact cache)
    assert all(r["cached_tokens"] >= TOKENS - 100 for r in shared)
    # `check` stays at chance however it is trained (adapters-aware/TRAINING.md): its answers flip either way under
    # any change of the cache and say nothing of sharing, so the guard counts the roles that learned their task
    learned = [role for role in ("extract", "count") if accuracy([r for r in stock if r["role"] == role]) >= 0.9]
    assert learned == ["extract", "count"]
    exact = accuracy([r for r in stock if r["role"] in learned])
    assert accuracy([r for r in shared if r["role"] in learned]) >= exact - 0.02
