"""Speculative decoding against plain decoding on the embedded SmolLM2, on copy-heavy chat
prompts (repeat / correct a paragraph), greedy, at batch 1 and 8, for k = 2, 4, 6 proposed
tokens per step (at most 16 verification rows a step, the engine's default, and once without
that cap). Both engines load once and run in this one process, alternating run by run, best of
`--repeats` each; outputs are checked to be equal token for token.

--method ngram (default): prompt lookup on the Q4_1 model as packed in its file.
--method draft: the target is SmolLM2 unquantized (fp32, `quantization="none"`), the draft the
same file packed (Q4_1): the exact fp32 model's output at close to the packed model's speed. The
packed model's own plain speed is printed for reference.

    .venv/bin/python benchmarks/bench_speculative.py [--method ngram|draft] [--threads 2] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import time

from lmserve import LLM, SamplingParams
from lmserve.default_model import DEFAULT_MODEL, resolve_embedded
from lmserve.quant.native import describe_cpu

PARAGRAPHS = [
    "The river rises in the hills above the town, runs past the mill and the old stone bridge, and reaches "
    "the sea after forty miles. Fishermen mend their nets on its banks every morning before the market opens.",
    "Our library opens at nine on weekdays and at ten on Saturdays. Books may be borrowed for three weeks and "
    "renewed twice, unless another reader has reserved them. Late returns cost ten cents a day.",
    "To reset the router, hold the small button on its back for ten seconds until the light turns orange, "
    "then wait two minutes for it to restart. Your settings and passwords will return to the factory ones.",
    "The committee met on Tuesday and agreed three things: the budget for next year, the date of the spring "
    "fair, and a new rule that members must reply to invitations within a week.",
]
TASKS = ["Repeat the following text exactly, word for word:\n\n{}",
         "Correct any spelling mistakes in this text and return the whole text:\n\n{}"]


def conversations(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": TASKS[i % len(TASKS)].format(PARAGRAPHS[i % len(PARAGRAPHS)])}]
            for i in range(n)]


def timed(llm: LLM, chats, params, repeats: int) -> tuple[float, list[list[int]]]:
    """(generated tokens per second, best of `repeats`, outputs)."""
    best, outputs = 0.0, []
    for _ in range(repeats):
        start = time.perf_counter()
        results = llm.chat(chats, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        outputs = [r.outputs[0].token_ids for r in results]
        best = max(best, sum(map(len, outputs)) / elapsed)
    return best, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--method", choices=("ngram", "draft"), default="ngram")
    args = parser.parse_args()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    common = {"threads": args.threads, "kv_cache_memory": "128MiB"}
    method = {"method": "ngram"}
    if args.method == "draft":
        common["quantization"] = "none"
        method = {"method": "draft", "model": resolve_embedded(DEFAULT_MODEL)}
    plain = LLM(**common)
    # k proposals per sequence, capped by the engine's default of 16 verification rows per step;
    # the last one uncapped, to show what the cap avoids
    configs = {f"{k}": {"num_speculative_tokens": k} for k in (2, 4, 6)}
    configs["6, uncapped"] = {"num_speculative_tokens": 6, "max_verify_rows": 1024}
    spec = {label: LLM(**common, speculative={**method, **options}) for label, options in configs.items()}
    target = "fp32 (unquantized), draft: the same file Q4_1 packed" if args.method == "draft" else "Q4_1"
    print(f"CPU: {describe_cpu()}; {args.threads} threads; SmolLM2-135M-Instruct {target}; {args.method}; "
          f"greedy, max_tokens {args.max_tokens}")
    if args.method == "draft":
        packed = LLM(threads=args.threads, kv_cache_memory="128MiB")
        for batch in (1, 8):
            rate, _ = timed(packed, conversations(batch), params, args.repeats)
            print(f"packed Q4_1 model alone, batch {batch}: {rate:.1f} tok/s")
        del packed
    print("| batch | k | plain tok/s | speculative tok/s | speedup | acceptance | accepted / step | same tokens |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for batch in (1, 8):
        chats = conversations(batch)
        timed(plain, chats[:1], SamplingParams(max_tokens=4, temperature=0), 1)  # warm-up
        for k, llm in spec.items():
            before = llm.engine.stats().spec
            base = rate = 0.0
            for _ in range(args.repeats):  # alternate, so a slow phase of the machine hits both
                plain_rate, expected = timed(plain, chats, params, 1)
                spec_rate, got = timed(llm, chats, params, 1)
                base, rate = max(base, plain_rate), max(rate, spec_rate)
            after = llm.engine.stats().spec
            proposed, accepted = after.num_proposed - before.num_proposed, after.num_accepted - before.num_accepted
            steps = after.num_verifications - before.num_verifications
            print(f"| {batch} | {k} | {base:.1f} | {rate:.1f} | {rate / base:.2f}x | "
                  f"{accepted / max(proposed, 1):.0%} | {accepted / max(steps, 1):.2f} | {got == expected} |")


if __name__ == "__main__":
    main()
