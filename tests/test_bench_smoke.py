"""bench/e2e.py end to end on the CPU, tiny (SmolLM2, N=2 agents, C=64, G=4): no timing assertions, but the counts
the benchmark reports must add up. One run as the benchmark always ran (W=1, one round, closed loop), one with
W=2 workflows of R=2 rounds, closed loop and then Poisson arrivals; and the pure parts (log parsing, stream merging,
graph flags, the table) without a server."""

import hashlib
import importlib.util
import json
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
    (res,) = e2e.main(["--cpu", "--systems", "recompute", "--no-progress", "--out", str(tmp_path)])
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
    assert (res["rounds"], res["mode"], res["request_rate"], res["arrivals_s"]) == (1, "closed", None, [0.0])
    assert 1 <= res["peak_running_reqs"] <= agents and res["retracted_reqs"] == 0
    assert [r["system"] for r in e2e.json.loads((tmp_path / "e2e.json").read_text())] == ["recompute"]


def test_stock_without_radix_cache_smoke(e2e, tmp_path, model_dir):
    (res,) = e2e.main(["--cpu", "--systems", "nocache", "--no-progress", "--out", str(tmp_path)])
    agents, context, suffix, gen = 2, 64, e2e.SUFFIX_TOKENS, 4
    assert (res["system"], res["requests"], res["output_tokens"]) == ("nocache", agents, agents * gen)
    # no radix cache: no prompt token is ever served from a cache
    assert res["prefill_tokens_computed"] == res["prompt_tokens"] == agents * (context + suffix)
    assert "peak_residual_slots" not in res and res["retracted_reqs"] == 0
    # (two agents on two adapters share nothing on stock either: that the server ran without the cache is its command)
    assert "--disable-radix-cache" in (tmp_path / "server-nocache.log").read_text().splitlines()[0].split()
    with pytest.raises(ValueError, match="unknown systems"):
        e2e.main(["--cpu", "--systems", "stock,typo", "--out", str(tmp_path)])


def expected_prompt_digests(e2e, records: list, workflows: int, agents: int, context: int, vocab: int, seed: int):
    """What each (workflow, round, agent) must have sent, rebuilt here from the seeded random draws and the output
    ids the run recorded: round r+1's shared context = round r's + every agent's outputs of round r, in agent order."""
    outputs = {(r["workflow"], r["round"], r["agent"]): r["output_ids"] for r in records}
    rounds = 1 + max(r["round"] for r in records)
    digests = {}
    for w, (shared, suffixes) in enumerate(e2e.workload(workflows, agents, context, vocab, seed)):
        for rnd in range(rounds):
            if rnd:
                suffixes = e2e.round_suffixes(agents, vocab, seed, w, rnd)
            for a in range(agents):
                ids = shared + suffixes[a]
                digests[w, rnd, a] = hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()
            for a in range(agents):
                shared = shared + outputs[w, rnd, a]
    return digests


def test_rounds_and_request_rate_smoke(e2e, tmp_path, model_dir):
    workflows, agents, rounds, context, suffix, gen, rate = 2, 2, 2, 64, e2e.SUFFIX_TOKENS, 4, 4.0
    rows = e2e.main(["--cpu", "--systems", "recompute", "--workflows", str(workflows), "--rounds", str(rounds),
                     "--request-rate", f"closed,{rate}", "--no-progress", "--out", str(tmp_path)])
    assert [(r["mode"], r["request_rate"]) for r in rows] == [("closed", None), ("poisson", rate)]
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    for res in rows:
        assert (res["workflows"], res["agents"], res["rounds"]) == (workflows, agents, rounds)
        assert res["requests"] == workflows * agents * rounds
        assert res["output_tokens"] == workflows * agents * rounds * gen
        # round r's prompt: C, then the N x G outputs of each earlier round, then the agent's suffix
        per_round = [workflows * agents * (context + r * agents * gen + suffix) for r in range(rounds)]
        assert res["round_prompt_tokens"] == per_round
        assert res["prompt_tokens"] == sum(per_round)
        # recompute: round 0 runs every prompt token; in round 1 each agent finds its own residuals of the round-0
        # context (C tokens, its cached round-0 sequence continues with its suffix) and runs the rest
        assert res["prefill_tokens_computed"] == (workflows * agents * (context + suffix)
                                                  + workflows * agents * (agents * gen + suffix))
        assert 1 <= res["peak_running_reqs"] <= workflows * agents
        assert res["retracted_reqs"] == 0
        records = [json.loads(line) for line in (tmp_path / res["requests_file"]).read_text().splitlines()]
        assert len(records) == res["requests"]
        assert all(len(r["output_ids"]) == gen for r in records)
        # the prompts sent are exactly the construction of the module docstring
        expected = expected_prompt_digests(e2e, records, workflows, agents, context, vocab, seed=0)
        assert {(r["workflow"], r["round"], r["agent"]): r["prompt_sha1"] for r in records} == expected
        # a workflow's round 1 starts only when all its round-0 agents are done
        for w in range(workflows):
            mine = [r for r in records if r["workflow"] == w]
            assert min(r["start_s"] for r in mine if r["round"] == 1) >= max(
                r["start_s"] + r["latency_s"] for r in mine if r["round"] == 0)
    closed, poisson = rows
    assert closed["arrivals_s"] == [0.0] * workflows
    assert poisson["arrivals_s"] == e2e.poisson_arrivals(workflows, rate, 0)
    assert poisson["arrivals_s"][0] == 0 < poisson["arrivals_s"][1]
    assert poisson["wall_s"] >= poisson["arrivals_s"][-1]
    # no workflow went out before its arrival (request start times count from the start of the run)
    for res in rows:
        for r in (json.loads(line) for line in (tmp_path / res["requests_file"]).read_text().splitlines()):
            assert r["start_s"] >= res["arrivals_s"][r["workflow"]] - 1e-3


def test_server_log_parsing(e2e):
    # the lines as SGLang 0.5.17 writes them (scheduler_components/metrics_reporter.py, scheduler.py)
    log = "\n".join([
        "[t] Prefill batch, #new-seq: 1, #new-token: 96, #cached-token: 0, token usage: 0.02, #running-req: 0, "
        "#queue-req: 1, #pending-token: 0, cpu graph: False, input throughput (token/s): 57.37",
        "[t] Prefill batch, #new-seq: 3, #new-token: 96, #cached-token: 0, token usage: 0.05, #running-req: 2, "
        "#queue-req: 0, #pending-token: 0, cpu graph: False, input throughput (token/s): 695.36",
        "[t] Decode batch, #running-req: 4, #token: 480, token usage: 0.06, cpu graph: False, gen throughput "
        "(token/s): 10.0, #queue-req: 1",
        "[t] KV cache pool is full. Retract requests. #retracted_reqs: 2, #new_tokens_gained: 96, "
        "#new_token_ratio: 0.5000 -> 0.7000",
        "[t] KV cache pool is full. Retract requests. #retracted_reqs: 1, #new_tokens_gained: 40, "
        "#new_token_ratio: 0.7000 -> 0.9000",
        "[t] Cache not flushed because there are pending requests. #queue-req: 0, #running-req: 9",
    ])
    # the decode batch of 4; not the prefill line's 2 + 3 (its running batch may hold finished requests), nor the
    # flush line, which is no batch
    assert e2e.peak_running_reqs(log) == 4
    assert e2e.retracted_reqs(log) == 3
    assert e2e.peak_kv_tokens(log, 10000) == 600


def test_stream_ids_and_flags(e2e):
    # SGLang's default stream repeats the whole output so far; --incremental-streaming-output sends deltas
    ids = []
    for chunk, n in (([7], 1), ([7, 8], 2), ([7, 8, 9], 3)):
        ids = e2e.merge_output_ids(ids, chunk, n)
    assert ids == [7, 8, 9]
    ids = []
    for chunk, n in (([7], 1), ([7], 2), ([9, 4], 4)):
        ids = e2e.merge_output_ids(ids, chunk, n)
    assert ids == [7, 7, 9, 4]
    assert e2e.graph_flags("off", 64) == ["--disable-cuda-graph"]
    assert e2e.graph_flags("decode", 4 * 8) == ["--disable-prefill-cuda-graph", "--cuda-graph-max-bs", "32"]
    assert e2e.graph_flags("decode", 3 * 3)[-1] == "16" and e2e.graph_flags("decode", 1)[-1] == "8"
    assert "--disable-cuda-graph" not in e2e.GPU_FLAGS
    # rows from before rounds and modes existed still make a table (empty cells)
    old = {"system": "stock", "agents": 2, "context": 8192, "wall_s": 12.3, "output_tok_s": 165.9}
    new = dict(old, rounds=2, mode="poisson", request_rate=0.5, peak_running_reqs=8, retracted_reqs=0)
    lines = e2e.table([old, new]).splitlines()
    assert lines[2].startswith("| stock | 2 |  |  | 8192 |")
    assert "| 2 | poisson 0.5/s |" in lines[3] and lines[3].endswith("| 8 | 0 |  |")
