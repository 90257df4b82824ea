"""Inference in either mode: the loader uses the stored prompts, and `policy-split-chat` in a pseudo-terminal."""

import os
import sys

import pytest
from fake_vllm import install_fake_vllm, save_tiny_lora_adapter
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
    child = pexpect.spawn(
        exe,
        ["--model", trained_folder, "--max_new_tokens", "5", "--temperature", "1.0"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        encoding="utf-8",
        timeout=120,
    )
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
    """No GPU here: the fake `vllm` (tests/fake_vllm.py) takes only what the real one takes, and records the calls."""
    vllm = install_fake_vllm(monkeypatch)
    model = DualModeModel.from_pretrained(trained_folder, backend="vllm")
    llm = vllm.built[-1]
    assert model.model is None and llm.kwargs == {"enable_lora": False}
    messages = [{"role": "user", "content": "6 x 7?"}]
    assert model.generate(messages, "high_entropy", max_new_tokens=9, top_k=0) == "forty-two"
    call = llm.calls[-1]
    assert call.prompts == [[{"role": "system", "content": PROMPT}, *messages]]
    assert (call.sampling_params.max_tokens, call.sampling_params.top_k) == (9, -1) and call.lora_request is None
    assert list(model.stream(messages, "normal")) == ["forty-two"] and llm.calls[-1].prompts == [messages]


def test_loader_with_vllm_serves_a_rank_32_adapter(tiny_model_path, tmp_path, monkeypatch):
    vllm = install_fake_vllm(monkeypatch)
    adapter = save_tiny_lora_adapter(tiny_model_path, str(tmp_path / "lora-r32"), r=32)
    model = DualModeModel.from_pretrained(tiny_model_path, adapter=adapter, backend="vllm")
    # vLLM loads the adapter with the first request: with its default max_lora_rank (16) this raised
    assert model.generate([{"role": "user", "content": "hi"}], max_new_tokens=4) == "forty-two"
    llm = vllm.built[-1]
    assert (llm.kwargs["enable_lora"], llm.kwargs["max_lora_rank"]) == (True, 32)
    assert llm.calls[-1].lora_request.lora_path == adapter
    os.remove(os.path.join(adapter, "adapter_config.json"))
    with pytest.raises(FileNotFoundError, match="lora-r32 has no adapter_config.json"):
        DualModeModel.from_pretrained(tiny_model_path, adapter=adapter, backend="vllm")


def test_chat_cli_passes_adapter_and_backend_through(tiny_model_path, tmp_path, monkeypatch):
    from policy_split_trl.scripts import chat

    vllm = install_fake_vllm(monkeypatch)
    adapter = save_tiny_lora_adapter(tiny_model_path, str(tmp_path / "lora-r32"), r=32)
    started = {}
    monkeypatch.setattr(chat, "chat", lambda model, mode, sampling: started.update(model=model, sampling=sampling))
    monkeypatch.setattr(
        sys,
        "argv",
        ["policy-split-chat", "--model", tiny_model_path, "--adapter", adapter, "--backend", "vllm", "--top_k", "0"],
    )
    chat.cli()
    assert started["model"].llm is vllm.built[-1] and vllm.built[-1].kwargs["max_lora_rank"] == 32
    assert started["model"].lora_request.lora_path == adapter and started["sampling"]["top_k"] == 0
