"""A four-agent debate over one shared document: fork, join, fork again over the grown transcript, then judge.

    python examples/debate.py [--url URL] [--mode recompute|eager] [--records 30] [--max-tokens 24]

Each round forks four debaters over everything said so far, three on LoRA adapters and one on the base model
(`lora_path=None` in the fork's list), and joins their arguments into the shared transcript; a base-model judge
then picks a side with `sgl.select`. With --forkkv every round's context is stored once for all four debaters.
"""

from _shared import backend, parse_args, report_savings, stats

import sglang as sgl
from sglang_forkkv.cpu_engine import shared_document

# (adapter, side): None is the base model
DEBATERS = [("planner", "for"), ("coder", "against"), ("critic", "for"), (None, "against")]
MOTION = "Every pending order in this ledger should ship this week."


@sgl.function
def debate(s, document, rounds, max_tokens):
    s += f"{document}\n\nMotion: {MOTION}\n"
    for r in range(rounds):
        floor = s.fork(len(DEBATERS), lora_path=[lora for lora, _ in DEBATERS])
        for i, (_, side) in enumerate(DEBATERS):
            turn = f"\nDebater {i + 1} ({side}), round {r + 1}: I argue that"
            floor[i] += turn + sgl.gen(f"arg{r}", max_tokens, stop="\n")
        floor.join()  # s[f"arg{r}"]: the four arguments; they join the shared transcript
        for i, ((_, side), arg) in enumerate(zip(DEBATERS, s[f"arg{r}"])):
            s += f"\nDebater {i + 1} ({side}), round {r + 1}: I argue that{arg}"
    s += "\n\nJudge: is the motion carried? Answer: " + sgl.select("verdict", choices=["yes", "no"])


def main():
    args = parse_args(__doc__, records=30)
    with backend(args) as be:
        before = stats(be)
        state = debate.run(document=shared_document(args.records, seed=2), rounds=2, max_tokens=args.max_tokens,
                           temperature=0, backend=be)
        state.sync()
        if state.error() is not None:
            raise SystemExit(f"the program failed: {state.error()}")
        after = stats(be)
    print(state.text()[state.text().index("Motion:"):])
    report_savings(before, after)


if __name__ == "__main__":
    main()
