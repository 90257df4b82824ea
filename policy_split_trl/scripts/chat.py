"""Chat with a dual-mode model in a chosen mode (`policy-split-chat`), with streaming output.

    policy-split-chat --model my-org/qwen3-1.7b-policy-split --mode high_entropy

Commands: `/mode normal|high_entropy` switches the mode (the conversation is kept: each reply is generated with the
current mode's system prompt), `/reset` clears the conversation, `/exit` (or Ctrl-D) quits.
"""

from __future__ import annotations

import argparse
import json
import sys

from policy_split_trl.modes import NORMAL_MODE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="policy-split-chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", required=True, help="Hub id, local folder or embedded:<name>.")
    p.add_argument("--adapter", help="LoRA adapter folder on top of --model.")
    p.add_argument("--mode", default=NORMAL_MODE, help="Mode to start in.")
    p.add_argument("--max_new_tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.6, help="0 decodes greedily.")
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--top_k", type=int, default=20)
    p.add_argument("--chat_template_kwargs", type=json.loads, default={}, help='JSON, e.g. {"enable_thinking": false}')
    p.add_argument("--backend", choices=["auto", "transformers", "vllm"], default="transformers",
                   help="vLLM generates whole replies (no token streaming).")  # fmt: skip
    return p


def chat(model, mode: str, sampling: dict, read=input, write=sys.stdout.write) -> None:
    """The read-reply loop; `read`/`write` are injectable for tests."""
    if mode not in model.modes:
        raise SystemExit(f"Unknown mode {mode!r}; this model has {model.modes}.")
    history: list[dict[str, str]] = []
    write(f"Modes: {', '.join(model.modes)}. Commands: /mode NAME, /reset, /exit.\n")
    while True:
        try:
            line = read(f"[{mode}]> ").strip()
        except EOFError:
            write("\n")
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history.clear()
            write("Conversation cleared.\n")
            continue
        if line.startswith("/mode"):
            wanted = line.split(maxsplit=1)[1].strip() if " " in line else ""
            if wanted in model.modes:
                mode = wanted
                write(f"Switched to {mode}.\n")
            else:
                write(f"Unknown mode {wanted!r}; choose one of {', '.join(model.modes)}.\n")
            continue
        history.append({"role": "user", "content": line})
        reply = []
        for piece in model.stream(history, mode, **sampling):
            reply.append(piece)
            write(piece)
            sys.stdout.flush()
        write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def cli() -> None:
    """Console entry point `policy-split-chat`."""
    from policy_split_trl.inference import DualModeModel

    args = build_parser().parse_args()
    model = DualModeModel.from_pretrained(
        args.model, args.adapter, chat_template_kwargs=args.chat_template_kwargs, backend=args.backend
    )
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.top_k}  # fmt: skip
    chat(model, args.mode, sampling)


if __name__ == "__main__":
    cli()
