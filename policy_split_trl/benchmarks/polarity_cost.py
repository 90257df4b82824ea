"""
Cost of the entropy-polarity diagnostics: the exact full-vocabulary no-grad pass against the training passes it sits
next to, on the same rows.

    python -m policy_split_trl.benchmarks.polarity_cost                       # embedded SmolLM2-135M, CPU
    python -m policy_split_trl.benchmarks.polarity_cost --completion_tokens 512 --device cuda

It times, alternately and `--repeats` times each, (a) one forward with gradients + backward over a generation batch
(the least a training step does with those rows; Policy Split does it once per context) and (b)
[`~policy_split_trl.polarity.full_vocab_polarity_pass`] over the same rows (Policy Split runs it once per context
too), and prints the medians and their ratio. Generation is not in the denominator, so the share of a whole step is
smaller than the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from policy_split_trl.embedded import resolve_model_id
from policy_split_trl.polarity import full_vocab_polarity_pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m policy_split_trl.benchmarks.polarity_cost", description=__doc__)
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct", help="Hub id, folder or embedded:<name>")
    parser.add_argument("--rows", type=int, default=8, help="rollouts of the generation batch")
    parser.add_argument("--prompt_tokens", type=int, default=48)
    parser.add_argument("--completion_tokens", type=int, default=96)
    parser.add_argument("--chunk_tokens", type=int, default=512, help="polarity_chunk_tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num_threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    parser.add_argument("--output", default=None, help="also write the result as JSON here")
    return parser


def run(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_id(args.model), dtype=torch.float32).to(args.device)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (args.rows, args.prompt_tokens), generator=generator).to(args.device)
    completion = torch.randint(0, vocab, (args.rows, args.completion_tokens), generator=generator).to(args.device)
    prompt_mask, completion_mask = torch.ones_like(prompt), torch.ones_like(completion)
    input_ids = torch.cat([prompt, completion], 1)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1)

    def train_passes() -> None:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, args.prompt_tokens - 1 : -1]
        torch.log_softmax(logits.float(), -1).gather(-1, completion.unsqueeze(-1)).mean().backward()

    def polarity_pass() -> None:
        full_vocab_polarity_pass(
            model, prompt, prompt_mask, completion, completion_mask, 1.0, args.chunk_tokens, batch_size=args.rows
        )

    def timed(fn) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    train_passes(), polarity_pass()  # warm-up
    times: dict[str, list[float]] = {"train_forward_backward": [], "polarity_pass": []}
    for _ in range(args.repeats):  # alternated, so drift in the machine's speed hits both alike
        times["train_forward_backward"].append(timed(train_passes))
        times["polarity_pass"].append(timed(polarity_pass))
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "model": args.model,
        "vocab_size": vocab,
        "rows": args.rows,
        "prompt_tokens": args.prompt_tokens,
        "completion_tokens": args.completion_tokens,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "seconds": times,
        "median_seconds": medians,
        "ratio": medians["polarity_pass"] / medians["train_forward_backward"],
    }
    print(
        f"{args.model} (V = {vocab}) on {args.device}, {args.rows} rows x ({args.prompt_tokens} prompt + "
        f"{args.completion_tokens} completion) tokens, median of {args.repeats}: forward+backward "
        f"{medians['train_forward_backward']:.3f} s, polarity pass {medians['polarity_pass']:.3f} s, "
        f"ratio {result['ratio']:.2f}"
    )
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    run()
