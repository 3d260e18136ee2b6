"""SGLang frontend programs choosing LoRA adapters (patches/common/0002-frontend-lora.patch), over HTTP.

One CPU server with --forkkv and one stock server (per-adapter radix cache) live for the module, both with the
planner / coder / critic adapters and "twin" (coder's weights under another name). On the forkkv server the base entries of a prefix belong to whichever adapter
prefilled it first, even a prefix of one token: every context here starts with its own first token (`context`),
so no test reuses another's entries.
"""

import pytest
import requests
import sglang as sgl
from transformers import AutoTokenizer

import sglang.lang.backend.runtime_endpoint as runtime_endpoint
from _server import running_server
from sglang_forkkv.cpu_engine import shared_document
from sglang_forkkv.frontend import cache_stats

MAX_NEW = 8
ORDINALS = ("First", "Second", "Third", "Fourth", "Fifth", "Sixth")


@pytest.fixture(scope="module")
def servers(model_dir, adapter_dirs):
    """{"forkkv": RuntimeEndpoint, "stock": RuntimeEndpoint}; "twin" loads coder's weights under another name."""
    loras = ["--enable-lora", "--max-loras-per-batch", "5", "--lora-paths"]
    loras += [f"{name}={path}" for name, path in {**adapter_dirs, "twin": adapter_dirs["coder"]}.items()]
    with running_server(model_dir, "--forkkv", *loras) as forkkv_url, running_server(model_dir, *loras) as stock_url:
        yield {"forkkv": sgl.RuntimeEndpoint(forkkv_url), "stock": sgl.RuntimeEndpoint(stock_url)}


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@sgl.function
def fork_team(s, document, branch_loras, size=3):
    """`size` agents fork over one document; branch_loras: the fork's lora_path (None: inherit the program's).
    (Not `n`: program.run takes n as the sampling parameter.)"""
    s += document + "\n\n"
    team = s.fork(size, lora_path=branch_loras)
    for i in range(size):
        # Each branch's own text starts with its own token: a token all branches add after the context would be
        # shared base written by whichever branch the server schedules first, and the first branch not exact.
        team[i] += f"{ORDINALS[i]} agent: the record that matters most is" + sgl.gen("answer", max_tokens=MAX_NEW, temperature=0)
    team.join()
    return team


def context(tag: str, records: int) -> str:
    """A shared document whose first token (the tag's) no other prompt in this module starts with."""
    return f"{tag} team notes.\n" + shared_document(records, seed=len(tag))


def run_team(backend, document, branch_loras, size=3, **run_kwargs):
    state = fork_team.run(document=document, branch_loras=branch_loras, size=size, backend=backend, **run_kwargs)
    state.sync()
    assert state.error() is None, state.error()
    return state.ret_value


def answers(team, size=3) -> list[str]:
    return [team[i]["answer"] for i in range(size)]


def agreement(tokenizer, got: str, want: str) -> float:
    """Share of positions where the two greedy outputs have the same token."""
    a, b = tokenizer(got)["input_ids"], tokenizer(want)["input_ids"]
    return sum(x == y for x, y in zip(a, b)) / max(len(b), 1)


@pytest.mark.parametrize(
    "branch_loras, program_lora, tag",
    [(["coder"] * 3, None, "Alpha"), ([None] * 3, None, "Charlie"), (None, "critic", "Delta")],
    ids=["fork-coder", "fork-no-adapter", "program-critic"],
)
def test_one_adapter_fork_matches_stock(servers, branch_loras, program_lora, tag):
    """Every branch on one adapter (or none), given per branch or per program: exactly stock's outputs."""
    document = context(tag, 6)
    before = cache_stats(servers["forkkv"])
    got = answers(run_team(servers["forkkv"], document, branch_loras, lora_path=program_lora))
    after = cache_stats(servers["forkkv"])
    want = answers(run_team(servers["stock"], document, branch_loras, lora_path=program_lora))
    assert got == want
    # the adapter reached the server: residual entries exist exactly when an adapter ran
    adapter_ran = (branch_loras or [program_lora])[0] is not None
    assert (after["residual_tokens"] > before["residual_tokens"]) == adapter_ran


def test_twin_adapters_fork_exactly(servers):
    """Two names for one adapter's weights: the twin's branch reuses the coder's base entries, and since their
    hidden states are the same, every branch still gives exactly stock's outputs."""
    document = context("Quebec", 10)
    branch_loras = ["coder", "twin", "twin"]
    got = answers(run_team(servers["forkkv"], document, branch_loras))
    assert got == answers(run_team(servers["stock"], document, branch_loras))


@pytest.mark.parametrize("branch_loras", [["planner", "coder", "critic"], ["coder", None, "critic"]],
                         ids=["three-adapters", "adapters-and-base"])
def test_fork_shares_one_base_copy(servers, tokenizer, branch_loras):
    """Branches on different adapters (and the base model) reuse one base copy of the shared context."""
    document = context("Hotel" if branch_loras[1] else "India", 12)
    doc_len = len(tokenizer(document)["input_ids"])
    commit_len = len(tokenizer(document + "\n\n")["input_ids"])
    before = cache_stats(servers["forkkv"])
    team = run_team(servers["forkkv"], document, branch_loras)
    after = cache_stats(servers["forkkv"])
    want = answers(run_team(servers["stock"], document, branch_loras))

    got = answers(team)
    for lora, g, w in zip(branch_loras, got, want):
        print(f"{branch_loras} branch {lora}: agreement with stock {agreement(tokenizer, g, w):.2f}")
    # the fork's shared context is prefilled under the first branch's adapter: that branch is exact
    assert got[0] == want[0]

    metas = [team[i].get_meta_info("answer") for i in range(3)]
    for meta in metas:
        assert meta["cached_tokens"] >= doc_len, meta
    own = sum(m["prompt_tokens"] + m["completion_tokens"] - commit_len for m in metas)
    base_added = after["base_tokens"] - before["base_tokens"]
    # one copy of the context plus each branch's own tokens, where a per-adapter cache holds one per adapter
    assert doc_len <= base_added <= commit_len + own, (base_added, doc_len, own)
    adapters = sum(lora is not None for lora in branch_loras)
    per_adapter_added = after["per_adapter_equivalent_tokens"] - before["per_adapter_equivalent_tokens"]
    assert per_adapter_added >= adapters * doc_len
    assert after["saved_bytes"] - before["saved_bytes"] > 0


@pytest.mark.filterwarnings("ignore:Error in stream_executor")  # the failing branches' tracebacks
def test_unknown_adapter_fails_only_its_branch(servers):
    """Unknown names fail their branches with the server's error naming them; the others, and the server, go on.
    The first branch's adapter is unknown too, so the shared prefill falls to the next branch's adapter."""
    document = context("Juliet", 4)
    branch_loras = ["no-such-agent", "planner", "no-such-critic", "critic"]
    before = cache_stats(servers["forkkv"])
    state = fork_team.run(document=document, branch_loras=branch_loras, size=4, backend=servers["forkkv"])
    state.sync()
    team = state.ret_value
    for i, lora in enumerate(branch_loras):
        if lora.startswith("no-such"):
            error = team[i].error()
            assert isinstance(error, RuntimeError) and lora in str(error), error
            assert "answer" not in team[i]
        else:
            assert team[i].error() is None and team[i]["answer"], team[i].error()
    # the planner's prefill of the context served the critic too
    assert team[3].get_meta_info("answer")["cached_tokens"] > 0
    assert cache_stats(servers["forkkv"])["base_hit_tokens"] > before["base_hit_tokens"]
    # and the server still serves
    body = {"text": "Server check:", "sampling_params": {"max_new_tokens": 2}, "lora_path": "critic"}
    assert requests.post(servers["forkkv"].base_url + "/generate", json=body, timeout=300).status_code == 200


PREFIX = "Shared briefing for every agent: the ledger below lists orders, totals and shipping states. "


@sgl.function
def tour(s, with_selects):
    s += PREFIX
    s += "Status:" + sgl.gen("default", max_tokens=2, temperature=0)
    s += " Critic says:" + sgl.gen("override", max_tokens=2, temperature=0, lora_path="critic")
    if with_selects:
        s += " Shipped? " + sgl.select("pick", choices=["yes", "no"])
        s += " Coder agrees? " + sgl.gen("pick2", choices=["yes", "no"], lora_path="coder")
    team = s.fork(2, lora_path=["coder", None])
    team += " Next:" + sgl.gen("branch", max_tokens=2, temperature=0)
    team.join()


@sgl.function
def batch_item(s, question):
    s += PREFIX
    s += question + sgl.gen("answer", max_tokens=2, temperature=0)


def _kind(payload: dict) -> str:
    if payload.get("stream"):
        return "stream"
    if payload["sampling_params"]["max_new_tokens"] == 0:
        return "select" if payload.get("return_logprob") else "prefill"
    return "gen"


def test_adapter_reaches_every_request(servers, monkeypatch):
    """Program default, per-gen and per-select overrides, fork branches, streaming and cache_prefix all send
    the adapter they resolve to in the request's lora_path."""
    sent = []
    real_http_request = runtime_endpoint.http_request

    def spy(url, json=None, **kwargs):
        if url.endswith("/generate"):
            sent.append((_kind(json), json.get("lora_path")))
        return real_http_request(url, json=json, **kwargs)

    monkeypatch.setattr(runtime_endpoint, "http_request", spy)
    gen_loras = ["planner", "critic", "coder", None]  # program default, per-gen override, the two branches
    selects = [("prefill", "planner"), ("select", "planner"), ("prefill", "coder"), ("select", "coder")]
    fork_commit = [("prefill", "coder")]  # the shared context, under the first branch's adapter
    for stream in (False, True):  # select does not stream: run it once
        sent.clear()
        state = tour.run(with_selects=not stream, backend=servers["forkkv"], lora_path="planner", stream=stream)
        for _ in state.text_iter():  # a streamed program runs in its own thread: wait for its end
            pass
        state.sync()
        assert state.error() is None, state.error()
        gen_kind = "stream" if stream else "gen"
        want = [(gen_kind, lora) for lora in gen_loras] + (selects if not stream else []) + fork_commit
        assert sorted(sent, key=repr) == sorted(want, key=repr)

    sent.clear()
    states = batch_item.run_batch([{"question": " Q1?"}, {"question": " Q2?"}], lora_path="critic",
                                  backend=servers["forkkv"])
    assert all(s.error() is None for s in states)
    assert sorted(sent, key=repr) == sorted([("prefill", "critic"), ("gen", "critic"), ("gen", "critic")], key=repr)


def _openai(url, path, body):
    return requests.post(url + path, json={"temperature": 0, "max_tokens": MAX_NEW, **body}, timeout=300)


def test_openai_endpoints_choose_adapters(servers, tokenizer):
    """`model="<model>:<adapter>"` or a `lora_path` field (SGLang 0.5.17's convention) on /v1/completions and
    /v1/chat/completions; with --forkkv, two adapters' chats over one system prompt share its base entries."""
    urls = {name: backend.base_url for name, backend in servers.items()}
    served = servers["stock"].get_model_name()
    prompt = "Three facts about the order ledger: first,"
    outs = {}
    for name, url in urls.items():
        by_model = _openai(url, "/v1/completions", {"model": f"{served}:coder", "prompt": prompt})
        assert by_model.status_code == 200, by_model.text
        outs[name] = by_model.json()["choices"][0]["text"]
    by_field = _openai(urls["forkkv"], "/v1/completions", {"model": served, "lora_path": "coder", "prompt": prompt})
    assert by_field.status_code == 200, by_field.text
    assert outs["forkkv"] == outs["stock"] == by_field.json()["choices"][0]["text"]

    system = context("Kilo", 8)
    system_len = len(tokenizer(system)["input_ids"])
    chats = {}
    for name, url in urls.items():
        before = cache_stats(servers["forkkv"])
        replies = []
        for body in ({"model": f"{served}:planner"}, {"model": served, "lora_path": "critic"}):
            messages = [{"role": "system", "content": system}, {"role": "user", "content": "Which order is late?"}]
            reply = _openai(url, "/v1/chat/completions", {**body, "messages": messages})
            assert reply.status_code == 200, reply.text
            replies.append(reply.json()["choices"][0]["message"]["content"])
        chats[name] = replies
        if name == "forkkv":
            after = cache_stats(servers["forkkv"])
            # the critic's chat found the planner's base entries for the system prompt
            assert after["base_hit_tokens"] - before["base_hit_tokens"] >= system_len
    assert chats["forkkv"][0] == chats["stock"][0]
    print(f"openai chat critic: agreement with stock {agreement(tokenizer, chats['forkkv'][1], chats['stock'][1]):.2f}")

    bad = _openai(urls["forkkv"], "/v1/chat/completions",
                  {"model": f"{served}:no-such-adapter", "messages": [{"role": "user", "content": "Hi"}]})
    assert bad.status_code == 400 and "no-such-adapter" in bad.text
