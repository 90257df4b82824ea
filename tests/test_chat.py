"""`policy-split-chat`: unknown commands never reach the model; Ctrl-C quits at the prompt and stops a reply mid-way."""

import os
import sys

import pytest

from policy_split_trl.scripts.chat import chat


class FakeModel:
    """Records every conversation it is asked to continue; `interrupt_on` raises Ctrl-C in the middle of a reply."""

    modes = ("normal", "high_entropy")

    def __init__(self, interrupt_on: str | None = None):
        self.calls = []
        self.interrupt_on = interrupt_on

    def stream(self, history, mode, **sampling):
        self.calls.append(([dict(m) for m in history], mode))
        yield "partial "
        if history[-1]["content"] == self.interrupt_on:
            raise KeyboardInterrupt
        yield "reply"


def run(lines, model):
    """Feed `lines` to the chat loop (then Ctrl-D); returns what it wrote."""
    pending, out = list(lines), []

    def read(prompt):
        out.append(prompt)
        if not pending:
            raise EOFError
        line = pending.pop(0)
        if line is KeyboardInterrupt:
            raise KeyboardInterrupt
        return line

    chat(model, "normal", {}, read=read, write=out.append)
    return "".join(out)


def test_unknown_commands_are_not_sent_to_the_model():
    model = FakeModel()
    text = run(["/bogus", "/modes high_entropy", "//etc/hosts is a file", "hello"], model)
    assert "Unknown command '/bogus'" in text and "Unknown command '/modes'" in text
    # Only the two messages reached the model; `//` escaped a leading slash.
    assert [history[-1]["content"] for history, _ in model.calls] == ["/etc/hosts is a file", "hello"]


def test_ctrl_c_at_the_prompt_quits_quietly():
    model = FakeModel()
    text = run(["hi", KeyboardInterrupt, "never read"], model)
    assert len(model.calls) == 1 and text.endswith("\n")


def test_ctrl_c_during_a_reply_drops_that_turn_and_keeps_the_session():
    model = FakeModel(interrupt_on="stop me")
    text = run(["first", "stop me", "third"], model)
    assert "[reply interrupted]" in text
    # The interrupted turn is not in the conversation the next reply continues.
    history, _ = model.calls[-1]
    assert [m["content"] for m in history] == ["first", "partial reply", "third"]


def test_ctrl_c_in_a_real_terminal_exits_without_a_traceback(tiny_model_path):
    pexpect = pytest.importorskip("pexpect")
    exe = os.path.join(os.path.dirname(sys.executable), "policy-split-chat")
    child = pexpect.spawn(
        exe,
        ["--model", tiny_model_path, "--max_new_tokens", "3"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        encoding="utf-8",
        timeout=120,
    )
    try:
        child.expect_exact("[normal]> ")
        child.sendline("/nope")
        child.expect_exact("Unknown command '/nope'")
        child.expect_exact("[normal]> ")
        child.sendintr()  # Ctrl-C at the prompt
        child.expect(pexpect.EOF)
        assert "Traceback" not in child.before
    finally:
        child.close()
    assert child.exitstatus == 0
