"""Inference in either mode: the loader uses the stored prompts, and `policy-split-chat` in a pseudo-terminal."""

import os
import sys

import pytest
from test_trainer import make_trainer

from policy_split_trl.hub import POLICY_SPLIT_FILE
from policy_split_trl.inference import DualModeModel
from policy_split_trl.modes import HIGH_ENTROPY_SYSTEM_PROMPT

PROMPT = "Stored exploring prompt."


@pytest.fixture
def trained_folder(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, max_steps=1, high_entropy_system_prompt=PROMPT)
    trainer.train()
    trainer.save_model()
    return str(tmp_path / "out")


def test_loader_uses_the_stored_prompts_and_streams(trained_folder):
    model = DualModeModel.from_pretrained(trained_folder)
    assert model.modes == ["normal", "high_entropy"] and model.prompts["high_entropy"] == PROMPT
    messages = [{"role": "user", "content": "2 + 2 ="}]
    assert model.prompt(messages, "high_entropy")[0] == {"role": "system", "content": PROMPT}
    assert model.prompt(messages, "normal") == messages
    greedy = model.generate(messages, "high_entropy", max_new_tokens=6, temperature=0)
    assert isinstance(greedy, str) and greedy
    assert "".join(model.stream(messages, "high_entropy", max_new_tokens=6, temperature=0)) == greedy
    with pytest.raises(ValueError, match="Unknown mode"):
        model.prompt(messages, "low_entropy")  # not a mode of this model


def test_loader_without_policy_split_json_falls_back_to_the_papers_prompts(trained_folder, caplog):
    os.remove(os.path.join(trained_folder, POLICY_SPLIT_FILE))
    model = DualModeModel.from_pretrained(trained_folder)
    assert model.prompts["high_entropy"] == HIGH_ENTROPY_SYSTEM_PROMPT
    assert "no policy_split.json" in caplog.text


def test_chat_cli_in_a_pseudo_terminal(trained_folder):
    pexpect = pytest.importorskip("pexpect")
    exe = os.path.join(os.path.dirname(sys.executable), "policy-split-chat")
    child = pexpect.spawn(exe, ["--model", trained_folder, "--max_new_tokens", "5", "--temperature", "1.0"],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, encoding="utf-8", timeout=120)  # fmt: skip
    try:
        child.expect_exact("[normal]> ")
        child.sendline("hello there")
        child.expect_exact("[normal]> ")  # a reply was streamed, then the prompt came back
        assert child.before.strip() != "hello there"
        child.sendline("/mode high_entropy")
        child.expect_exact("Switched to high_entropy.")
        child.expect_exact("[high_entropy]> ")
        child.sendline("and again")
        child.expect_exact("[high_entropy]> ")
        child.sendline("/mode bogus")
        child.expect_exact("Unknown mode 'bogus'")
        child.sendline("/reset")
        child.expect_exact("Conversation cleared.")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_loader_with_vllm_calls_llm_chat_with_the_stored_prompt(trained_folder, monkeypatch):
    """No GPU here: a fake `vllm` module records the chat call."""
    import types

    seen = {}

    class FakeLLM:
        def __init__(self, **kwargs):
            seen["init"] = kwargs

        def chat(self, messages, params, **kwargs):
            seen.update(messages=messages, params=params, kwargs=kwargs)
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text="forty-two")])]

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = FakeLLM, lambda **kw: types.SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    model = DualModeModel.from_pretrained(trained_folder, backend="vllm")
    assert model.model is None and seen["init"]["enable_lora"] is False
    messages = [{"role": "user", "content": "6 x 7?"}]
    assert model.generate(messages, "high_entropy", max_new_tokens=9, top_k=0) == "forty-two"
    assert seen["messages"][0] == {"role": "system", "content": PROMPT}
    assert (seen["params"].max_tokens, seen["params"].top_k) == (9, -1)
    assert list(model.stream(messages, "normal")) == ["forty-two"] and seen["messages"] == messages
