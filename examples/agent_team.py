"""A planner / coder / critic team over one shared document, written in SGLang's frontend language.

    python examples/agent_team.py [--url URL] [--mode recompute|eager] [--records 40] [--max-tokens 24]

The three agents fork over the document, each on its own LoRA adapter (`s.fork(3, lora_path=[...])`); the
critic then judges the planner's and the coder's notes with a per-call adapter (`sgl.gen(..., lora_path=)`).
With --forkkv the document's KV is stored once for all three: the run prints what that saved.
"""

from _shared import backend, parse_args, report_savings, stats

import sglang as sgl
from sglang_forkkv.cpu_engine import shared_document

ROLES = ["planner", "coder", "critic"]


@sgl.function
def team(s, document, max_tokens):
    s += document + "\n\n"
    agents = s.fork(3, lora_path=ROLES)  # one adapter per branch; the document is prefilled once
    agents[0] += "Planner: to audit this ledger, first" + sgl.gen("note", max_tokens, stop="\n")
    agents[1] += "Coder: a Python function that totals the pending orders:\n" + sgl.gen("note", max_tokens)
    agents[2] += "Critic: the record most likely to be wrong is" + sgl.gen("note", max_tokens, stop="\n")
    agents.join()  # s["note"]: the three notes, in branch order
    plan, code, _ = s["note"]
    s += f"Plan:{plan}\nCode:\n{code}\n"
    s += "Critic's verdict on the plan and the code:" + sgl.gen("verdict", max_tokens, lora_path="critic")


def main():
    args = parse_args(__doc__, records=40)
    document = shared_document(args.records)
    with backend(args) as be:
        before = stats(be)
        state = team.run(document=document, max_tokens=args.max_tokens, temperature=0, backend=be)
        state.sync()
        if state.error() is not None:
            raise SystemExit(f"the program failed: {state.error()}")
        after = stats(be)
    for role, note in zip(ROLES, state["note"]):
        print(f"\n[{role}]{note}")
    print(f"\n[critic, verdict]{state['verdict']}")
    report_savings(before, after)


if __name__ == "__main__":
    main()
