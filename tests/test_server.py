"""`python -m sglang.launch_server ... --forkkv` over HTTP on loopback: errors, metrics, refusals."""

import shutil
import time

import pytest
import requests

from _server import run_until_exit, running_server


def generate(url, text, lora=None, max_new_tokens=8):
    body = {"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens}}
    if lora is not None:
        body["lora_path"] = lora
    return requests.post(url + "/generate", json=body, timeout=300)


def forkkv_gauges(url, settle_s: float = 10.0) -> dict:
    """sglang_forkkv_* gauges once the idle scheduler has exported the finished requests' inserts."""
    deadline = time.time() + settle_s
    while True:
        text = requests.get(url + "/metrics", timeout=30).text
        gauges = {line.split()[0].split("{")[0]: float(line.split()[-1]) for line in text.splitlines()
                  if line.startswith("sglang_forkkv_")}
        info = requests.get(url + "/get_server_info", timeout=30).json()["internal_states"][0]["forkkv"]
        if gauges.get("sglang_forkkv_residual_tokens") == info["residual_tokens"] or time.time() > deadline:
            return gauges
        time.sleep(1)


def test_server_errors_metrics_and_cached_tokens(model_dir, adapter_dirs):
    loras = [f"{name}={path}" for name, path in adapter_dirs.items()]
    with running_server(model_dir, "--forkkv", "--enable-metrics", "--enable-lora", "--max-loras-per-batch", "4",
                        "--lora-paths", *loras) as url:
        # an unknown adapter is a clear error for that request only
        bad = generate(url, "Hello", lora="no-such-adapter")
        assert bad.status_code >= 400
        assert "no-such-adapter" in bad.text

        context = "Shared notes: " + " ".join(f"item {i} costs {i * 3} coins." for i in range(60))
        first = generate(url, context + " Planner:", lora="planner")
        second = generate(url, context + " Critic:", lora="critic")
        assert first.status_code == 200 and second.status_code == 200, (first.text, second.text)
        # the critic's request found the planner's base entries of the shared context
        assert second.json()["meta_info"]["cached_tokens"] >= first.json()["meta_info"]["prompt_tokens"] - 8

        gauges = forkkv_gauges(url)
        assert gauges["sglang_forkkv_base_hit_tokens"] > 0
        assert gauges["sglang_forkkv_residual_tokens"] > 0
        assert gauges["sglang_forkkv_per_adapter_bytes"] > gauges["sglang_forkkv_forkkv_bytes"]

        info = requests.get(url + "/get_server_info", timeout=30).json()
        assert info["internal_states"][0]["forkkv"]["base_hit_tokens"] > 0


def test_refuses_model_with_k_norm(tmp_path, model_dir):
    """Qwen3 normalises K before RoPE: base + residual no longer add up, so --forkkv refuses it."""
    torch = pytest.importorskip("torch")
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    Qwen3ForCausalLM(config).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{model_dir}/{name}", tmp_path)
    code, output = run_until_exit(str(tmp_path), "--forkkv")
    assert code != 0
    assert "k_norm" in output and "breaks the additive base + residual split" in output


def test_refuses_unsupported_option(model_dir):
    code, output = run_until_exit(model_dir, "--forkkv", "--disable-radix-cache")
    assert code != 0
    assert "--forkkv does not support --disable-radix-cache" in output
