"""bench/e2e.py end to end on the CPU, tiny (SmolLM2, W=1 workflow, N=2 agents, C=64, G=4): no timing assertions,
but the counts the benchmark reports must add up."""

import importlib.util
from pathlib import Path

import pytest

E2E = Path(__file__).resolve().parents[1] / "bench" / "e2e.py"


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("bench_e2e", E2E)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_forkkv_recompute_smoke(e2e, tmp_path, model_dir):
    (res,) = e2e.main(["--cpu", "--systems", "recompute", "--out", str(tmp_path)])
    agents, context, suffix, gen = 2, 64, e2e.SUFFIX_TOKENS, 4
    assert res["requests"] == agents
    assert res["output_tokens"] == agents * gen
    assert res["prompt_tokens"] == agents * (context + suffix)
    # recompute mode: no agent had residuals for the shared context, so every prompt token was run
    assert res["prefill_tokens_computed"] == res["prompt_tokens"]
    assert 0 < res["ttft_median_s"] <= res["wall_s"]
    # both requests' prompts sat in the pools at once: residual slots for each agent, base entries for at least one
    assert res["peak_residual_slots"] >= agents * (context + suffix)
    assert context + suffix <= res["peak_kv_tokens"] <= res["kv_capacity_tokens"]
    assert [r["system"] for r in e2e.json.loads((tmp_path / "e2e.json").read_text())] == ["recompute"]
