"""--forkkv under tensor parallelism (`--tp 2`), on the CPU: two scheduler processes, one per rank, each holding its
slice of the KV heads in the base pool, a full copy of the residuals (x·A is the same on every rank: A is
replicated in SGLang's QKV LoRA) and its own DualRadixTree, which must make the same decisions on both ranks.

SmolLM2 has 9 query and 3 KV heads, which 2 ranks cannot split: a small random Llama (4 query, 2 KV heads) with two
random adapters stands in. Random weights are fine here: the test compares engines on the same inputs.
"""

import json
import os
import re
import shutil

import pytest
import requests

from _server import running_server, server_log

CONTEXT = "Shared notes: " + " ".join(f"item {i} costs {i * 3} coins." for i in range(40))
AGENTS = ["a", "b", None, "a"]  # a prefills the context; b and the adapter-free request reuse its base entries


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, model_dir):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sglang_forkkv.test_adapters import make_lora_adapter

    root = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    # initializer_range 0.1: peaked next-token distributions, so greedy outputs vary and near-ties are rare
    config = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                         tie_word_embeddings=True, initializer_range=0.1)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{model_dir}/{name}", root / "model")
    adapters = {name: make_lora_adapter(root / name, root / "model", rank=8, seed=seed)
                for name, seed in (("a", 1), ("b", 2))}
    return str(root / "model"), [f"{name}={path}" for name, path in adapters.items()]


def run_agents(tiny_llama, *flags, tp: int = 1):
    model, loras = tiny_llama
    # SGLang's CPU engine pins each rank's OpenMP threads to its own cores (one core each here)
    env = {"SGLANG_CPU_OMP_THREADS_BIND": "0|1" if (os.cpu_count() or 1) > 1 else "0|0"} if tp > 1 else {}
    with running_server(model, "--enable-lora", "--max-loras-per-batch", "3", "--lora-paths", *loras,
                        "--tp", str(tp), *flags, env=env) as url:
        outs = []
        for lora in AGENTS:
            body = {"text": f"{CONTEXT} Agent {lora}:", "lora_path": lora, "return_logprob": True,
                    "sampling_params": {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}}
            r = requests.post(url + "/generate", json=body, timeout=600)
            assert r.status_code == 200, r.text
            outs.append(r.json())
        stats = requests.get(url + "/get_server_info", timeout=30).json()["internal_states"][0].get("forkkv")
        log = server_log(url)
    return outs, stats, log


def logprobs(out) -> list[float]:
    return [entry[0] for entry in out["meta_info"]["output_token_logprobs"]]


def tree_lines(log: str, rank: int) -> list[str]:
    """Each rank's `forkkv cache:` log lines (its tree's token counts and hits after every prefill)."""
    return re.findall(rf"TP{rank}\] (forkkv cache: .*)", log)


@pytest.fixture(scope="module")
def sharded(tiny_llama):
    return run_agents(tiny_llama, "--forkkv", tp=2)


def test_tp2_equals_single_process(tiny_llama, sharded):
    outs1, stats1, _ = run_agents(tiny_llama, "--forkkv")
    outs2, stats2, log2 = sharded
    for lora, o1, o2 in zip(AGENTS, outs1, outs2):
        assert o2["output_ids"] == o1["output_ids"], lora
        # the ranks' partial sums add up in another order than one process's: float32 noise only
        assert max(abs(x - y) for x, y in zip(logprobs(o1), logprobs(o2))) < 1e-3, lora
        assert o2["meta_info"]["cached_tokens"] == o1["meta_info"]["cached_tokens"], lora
    # the shared context was reused across adapters on both ranks alike
    assert outs2[1]["meta_info"]["cached_tokens"] > 300
    keys = ("base_tokens", "residual_tokens", "base_hit_tokens", "residual_hit_tokens")
    assert {k: stats2[k] for k in keys} == {k: stats1[k] for k in keys}
    # one logical tree: both ranks logged the same cache state after every prefill
    rank0, rank1 = tree_lines(log2, 0), tree_lines(log2, 1)
    assert len(rank0) >= len(AGENTS)
    assert [re.sub(r"[\d.]+ MiB.*", "", line) for line in rank0] == [re.sub(r"[\d.]+ MiB.*", "", line) for line in rank1]


def test_tp2_first_agent_matches_stock_tp2(tiny_llama, sharded):
    """The agent that prefilled the context is exact under TP too (stock SGLang, --tp 2, same inputs)."""
    stock, _, _ = run_agents(tiny_llama, tp=2)
    forkkv, _, _ = sharded
    assert forkkv[0]["output_ids"] == stock[0]["output_ids"]
    assert max(abs(x - y) for x, y in zip(logprobs(forkkv[0]), logprobs(stock[0]))) < 1e-3
    print("agreement with stock tp2, per agent:",
          json.dumps([sum(x == y for x, y in zip(f["output_ids"], s["output_ids"])) / 12 for f, s in zip(forkkv, stock)]))
