"""Chat with a dual-mode model in a chosen mode (`policy-split-chat`), with streaming output.

    policy-split-chat --model my-org/qwen3-1.7b-policy-split --mode high_entropy

Commands: `/mode normal|high_entropy` switches the mode (the conversation is kept: each reply is generated with the
current mode's system prompt), `/reset` clears the conversation, `/exit` (or Ctrl-D, or Ctrl-C at the prompt) quits.
Any other line starting with `/` is an unknown command, never sent to the model; start a message with `//` to send one
that begins with `/`. Ctrl-C while a reply streams stops that reply (the turn is dropped from the conversation).
"""

from __future__ import annotations

import argparse
import json
import sys

from policy_split_trl.modes import NORMAL_MODE

COMMANDS = "Commands: /mode NAME, /reset, /exit (start a message with // to send a leading /)."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="policy-split-chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="Hub id, local folder or embedded:<name>.")
    p.add_argument("--adapter", help="LoRA adapter folder on top of --model.")
    p.add_argument("--mode", default=NORMAL_MODE, help="Mode to start in.")
    p.add_argument("--max_new_tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.6, help="0 decodes greedily.")
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--top_k", type=int, default=20)
    p.add_argument("--chat_template_kwargs", type=json.loads, default={}, help='JSON, e.g. {"enable_thinking": false}')
    p.add_argument(
        "--backend",
        choices=["auto", "transformers", "vllm"],
        default="transformers",
        help="vLLM generates whole replies (no token streaming).",
    )
    return p


def chat(model, mode: str, sampling: dict, read=input, write=sys.stdout.write) -> None:
    """The read-reply loop; `read`/`write` are injectable for tests."""
    if mode not in model.modes:
        raise SystemExit(f"Unknown mode {mode!r}; this model has {model.modes}.")
    history: list[dict[str, str]] = []
    write(f"Modes: {', '.join(model.modes)}. {COMMANDS}\n")
    while True:
        try:
            line = read(f"[{mode}]> ").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: leave quietly
            write("\n")
            return
        if not line:
            continue
        command, _, rest = line.partition(" ")
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            history.clear()
            write("Conversation cleared.\n")
            continue
        if command == "/mode":
            wanted = rest.strip()
            if wanted in model.modes:
                mode = wanted
                write(f"Switched to {mode}.\n")
            else:
                write(f"Unknown mode {wanted!r}; choose one of {', '.join(model.modes)}.\n")
            continue
        if line.startswith("//"):
            line = line[1:]  # an escaped slash: a message, not a command
        elif line.startswith("/"):
            write(f"Unknown command {command!r}. {COMMANDS}\n")
            continue
        history.append({"role": "user", "content": line})
        reply = []
        try:
            for piece in model.stream(history, mode, **sampling):
                reply.append(piece)
                write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:  # stop this reply, keep the session
            history.pop()
            write("\n[reply interrupted]\n")
            continue
        write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def cli() -> None:
    """Console entry point `policy-split-chat`."""
    from policy_split_trl.inference import DualModeModel

    args = build_parser().parse_args()
    model = DualModeModel.from_pretrained(
        args.model, args.adapter, chat_template_kwargs=args.chat_template_kwargs, backend=args.backend
    )
    sampling = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
    }
    chat(model, args.mode, sampling)


if __name__ == "__main__":
    cli()
