"""forkkv end to end on the real model (SmolLM2-135M-Instruct, float32) against stock SGLang 0.5.17.

Engines live for the module: stock (per-adapter radix cache), forkkv recompute, forkkv eager. Each test
uses its own prompts, so no test sees another's cache entries.
"""

import pytest
from _engine import start_engine, stop_engine

from sglang_forkkv.cpu_engine import shared_document

GREEDY = {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}
ROLES = ["planner", "coder", "critic"]


@pytest.fixture(scope="module")
def adapters(adapter_dirs):
    # "twin" loads coder's weights under another name: sharing between them must be exact.
    return {**adapter_dirs, "twin": adapter_dirs["coder"]}


@pytest.fixture(scope="module")
def stock(model_dir, adapters):
    engine = start_engine(model_dir, adapters)
    yield engine
    stop_engine(engine)


@pytest.fixture(scope="module")
def recompute(model_dir, adapters):
    engine = start_engine(model_dir, adapters, forkkv=True, forkkv_mode="recompute")
    yield engine
    stop_engine(engine)


@pytest.fixture(scope="module")
def eager(model_dir, adapters):
    engine = start_engine(model_dir, adapters, forkkv=True, forkkv_mode="eager")
    yield engine
    stop_engine(engine)


def stats(engine) -> dict:
    return engine.get_server_info()["internal_states"][0]["forkkv"]


def prompt_tokens(engine, text) -> int:
    return len(engine.tokenizer_manager.tokenizer(text)["input_ids"])


def agreement(a, b) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(len(b), 1)


def first_logprob(out) -> float:
    return out["meta_info"]["output_token_logprobs"][0][0]


@pytest.mark.parametrize("lora", ["planner", None], ids=["adapter", "no-adapter"])
def test_exact_without_sharing(stock, recompute, lora):
    """One adapter (or none) on fresh prompts: forkkv generates what stock SGLang generates."""
    # Continuations the model keeps going on (no early end of sequence, where near-ties make greedy
    # decoding sensitive to any batching difference). The two families start with different tokens:
    # a prefix shared with another adapter's requests would be shared base (DESIGN §3), not this test.
    topic = "Apples" if lora else "Ships"
    prompts = [f"{topic}: count them in crate {i}, one number per line:\n{i * 10}\n{i * 10 + 1}\n" for i in range(8)]
    want = stock.generate(prompts, GREEDY, lora_path=[lora] * 8, return_logprob=True)
    got = recompute.generate(prompts, GREEDY, lora_path=[lora] * 8, return_logprob=True)
    for w, g in zip(want, got):
        assert len(w["output_ids"]) == 32
        assert g["output_ids"] == w["output_ids"]
        assert abs(first_logprob(g) - first_logprob(w)) < 1e-4


def warm_up(engine, roles):
    """One tiny request per adapter makes each resident in the LoRA buffer (eager writes only for those)."""
    engine.generate(["ok"] * len(roles), {"temperature": 0, "max_new_tokens": 1}, lora_path=list(roles))


def run_agents(engine, document: str, roles=ROLES):
    """The first agent prefills the shared document alone, the others then fork over it together."""
    prompts = [f"{document}\n\nYou are the {role}. State the one fact that matters most:" for role in roles]
    first = engine.generate(prompts[0], GREEDY, lora_path=roles[0])
    rest = engine.generate(prompts[1:], GREEDY, lora_path=list(roles[1:]))
    return [first] + rest


@pytest.mark.parametrize("mode", ["recompute", "eager"])
def test_three_agents_share_one_base_copy(request, stock, mode):
    engine = request.getfixturevalue(mode)
    document = shared_document(80, seed={"recompute": 1, "eager": 3}[mode])
    doc_len = prompt_tokens(engine, document)
    assert doc_len >= 1500
    warm_up(engine, ROLES)
    before = stats(engine)
    outs = run_agents(engine, document)
    after = stats(engine)
    warm_up(stock, ROLES)
    want = run_agents(stock, document)

    # the agent whose prefill wrote the base entries is exact
    assert outs[0]["output_ids"] == want[0]["output_ids"]
    for role, o, w in zip(ROLES, outs, want):
        print(f"{mode} {role}: agreement with stock {agreement(o['output_ids'], w['output_ids']):.2f}")

    lengths = [o["meta_info"]["prompt_tokens"] + len(o["output_ids"]) for o in outs]
    own = sum(n - doc_len for n in lengths)
    base_added = after["base_tokens"] - before["base_tokens"]
    residual_added = after["residual_tokens"] - before["residual_tokens"]
    # one copy of the context plus each agent's own tokens, where a per-adapter cache holds three
    assert doc_len <= base_added <= doc_len + own
    per_adapter_added = after["per_adapter_equivalent_tokens"] - before["per_adapter_equivalent_tokens"]
    assert per_adapter_added >= 3 * doc_len
    # each adapter holds residuals for its own sequence (the last token of each has no KV yet); eager mode also
    # writes the other resident adapters' residuals over each agent's private tokens
    others = len(ROLES) - 1 if mode == "eager" else 0
    assert sum(n - 1 for n in lengths) <= residual_added <= sum(lengths) + others * own
    # the second and third agents found the context's base entries cached
    for o in outs[1:]:
        assert o["meta_info"]["cached_tokens"] >= doc_len
    if mode == "eager":
        # and their residuals too: nothing of the context computed again
        assert after["residual_hit_tokens"] - before["residual_hit_tokens"] >= 2 * doc_len
    else:
        assert after["residual_hit_tokens"] - before["residual_hit_tokens"] < doc_len


@pytest.mark.parametrize("mode", ["recompute", "eager"])
def test_twin_adapters_share_exactly(request, stock, mode):
    """Two names for the same weights: the second reuses the first's base (and in eager mode its
    residuals) and must still match stock, which computes everything itself."""
    engine = request.getfixturevalue(mode)
    document = shared_document(50, seed={"recompute": 5, "eager": 6}[mode])
    for e in (engine, stock):
        warm_up(e, ["coder", "twin"])
    outs = run_agents(engine, document, roles=["coder", "twin"])
    want = run_agents(stock, document, roles=["coder", "twin"])
    assert outs[1]["meta_info"]["cached_tokens"] >= prompt_tokens(engine, document)
    assert [o["output_ids"] for o in outs] == [w["output_ids"] for w in want]


def test_pressure_evicts_and_returns_every_slot(model_dir, adapter_dirs):
    """A pool far smaller than the working set: every request completes through eviction, and at idle
    every base and residual slot is free or held by a tree, with nothing locked."""
    engine = start_engine(model_dir, adapter_dirs, forkkv=True, max_total_tokens=1600, forkkv_residual_ratio=1.5)
    try:
        documents = [shared_document(14, seed=10 + i) for i in range(4)]
        prompts, loras = [], []
        for d in documents:
            for role in [*ROLES, None]:
                prompts.append(f"{d}\nAgent {role}: the key fact is")
                loras.append(role)
        sp = {"temperature": 0, "max_new_tokens": 12}
        outs = engine.generate(prompts, sp, lora_path=loras)
        outs += engine.generate(prompts[::-1], sp, lora_path=loras[::-1])
        assert all(o["meta_info"]["finish_reason"]["type"] in ("length", "stop") for o in outs)
        s = stats(engine)
        assert s["base_hit_tokens"] > 0
        assert s["base_tokens"] + s["base_free"] == s["base_capacity"]
        assert s["residual_tokens"] + s["residual_free"] == s["residual_capacity"]
        assert s["base_protected"] == 0 and s["residual_protected"] == 0
        # the working set did not fit: entries were evicted along the way
        assert sum(o["meta_info"]["prompt_tokens"] for o in outs) > s["base_capacity"]
    finally:
        stop_engine(engine)


def test_all_private_layers_make_every_agent_exact(model_dir, adapters, stock):
    """--forkkv-private-layers all: each adapter reads only K/V its own forward wrote, so every agent sharing the
    context (not only the first) generates what stock SGLang generates, while the base entries stay shared."""
    engine = start_engine(model_dir, adapters, forkkv=True, forkkv_private_layers="all")
    try:
        document = shared_document(40, seed=7)
        for e in (engine, stock):
            warm_up(e, ROLES)
        outs = run_agents(engine, document)
        want = run_agents(stock, document)
        assert [o["output_ids"] for o in outs] == [w["output_ids"] for w in want]
        for o in outs[1:]:
            assert o["meta_info"]["cached_tokens"] >= prompt_tokens(engine, document)
        s = stats(engine)
        # a residual slot now carries 30 layers of whole K and V (576 floats each in SmolLM2) beside its residual
        assert s["forkkv_bytes"] > s["residual_tokens"] * 30 * 2 * 192 * 4
    finally:
        stop_engine(engine)
