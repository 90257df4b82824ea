"""What a trained model carries: policy_split.json next to every saved model, and the Modes section of its card."""

import json

import pytest
from test_trainer import config, make_trainer
from tiny_model import arithmetic_dataset, build_model, length_reward

from policy_split_trl import PolicySplitGRPOTrainer, apply_mode
from policy_split_trl.hub import (
    POLICY_SPLIT_FILE,
    load_policy_split_config,
    mode_prompts,
    modes_card_section,
    policy_split_metadata,
)

PROMPT = "You are in exploring mode. Try an unusual approach."


def test_policy_split_json_in_checkpoints_and_final_model(tmp_path, tokenizer):
    trainer = make_trainer(
        tmp_path,
        tokenizer,
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        eta=0.05,
        high_entropy_system_prompt=PROMPT,
    )
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    for folder in (out / "checkpoint-1", out / "checkpoint-2", out):
        meta = json.loads((folder / POLICY_SPLIT_FILE).read_text())
        assert meta == policy_split_metadata(trainer.args)
    meta = load_policy_split_config(str(out))
    assert (
        meta["modes"]["high_entropy"]["system_prompt"] == PROMPT and meta["modes"]["normal"]["system_prompt"] is None
    )
    assert meta["training"]["eta"] == 0.05 and meta["training"]["kappa"] == 2.0
    assert meta["training"]["num_high_entropy_generations"] == 2 and meta["training"]["rollout_sharing"] is True

    # Reload and query in HE mode: the rendered prompt holds exactly the stored system prompt.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(str(out)), AutoTokenizer.from_pretrained(str(out))
    messages = apply_mode([{"role": "user", "content": "2 + 2 ="}], "high_entropy", mode_prompts(meta))
    assert messages[0] == {"role": "system", "content": PROMPT}
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert f"<|im_start|>system\n{PROMPT}<|im_end|>" in tok.decode(ids["input_ids"][0])
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 3


def test_policy_split_json_with_lora(tmp_path, tokenizer):
    peft = pytest.importorskip("peft")
    trainer = PolicySplitGRPOTrainer(
        model=build_model(tokenizer),
        reward_funcs=[length_reward],
        args=config(tmp_path, max_steps=1, save_strategy="steps", save_steps=1),
        train_dataset=arithmetic_dataset(8),
        processing_class=tokenizer,
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM"),
    )
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert (checkpoint / "adapter_model.safetensors").exists()
    assert load_policy_split_config(str(checkpoint)) == policy_split_metadata(trainer.args)


def test_model_card_has_modes_section(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, max_steps=1)
    results = {
        "per_benchmark": {
            "gsm8k": {
                "normal": {"avg_at_k": 0.5, "pass_at_k": 0.75, "entropy_bits": 0.61, "mean_length": 120.0},
                "high_entropy": {"avg_at_k": 0.25, "pass_at_k": 0.8, "entropy_bits": 0.79, "mean_length": 140.0},
            }
        }
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    trainer.create_model_card(model_name="tiny-ps", eval_results=str(path))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "policy-split" in card  # tag next to TRL's
    assert "## Modes" in card and "### With vLLM" in card and "### Use either mode with transformers" in card
    assert trainer.args.high_entropy_system_prompt in card  # the HE prompt, verbatim
    assert "| `normal` | (none) |" in card
    assert "| gsm8k | high_entropy | 25.00 | 80.00 | 0.790 | 140.0 |" in card
    assert "| `eta` | 0.03 |" in card


def test_missing_policy_split_json_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="was it trained with policy-split-trl"):
        load_policy_split_config(str(tmp_path))
    section = modes_card_section(
        {
            "modes": {
                "normal": {"system_prompt": None, "purpose": "p"},
                "high_entropy": {"system_prompt": "a | b", "purpose": "q"},
            }
        },
        "m",
    )
    assert "a \\| b" in section  # a pipe in a prompt does not break the table


def test_push_to_hub_uploads_weights_policy_split_json_and_the_card(tmp_path, tokenizer, monkeypatch):
    """No Hub here: a fake `hf_api` records what `trainer.push_to_hub()` would upload."""
    import pathlib
    import types

    import transformers.trainer

    uploaded = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return types.SimpleNamespace(repo_id=f"me/{repo_id}")

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploaded["repo_id"] = repo_id
            folder = pathlib.Path(folder_path)
            uploaded["files"] = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: FakeApi())
    trainer = make_trainer(tmp_path, tokenizer, max_steps=1, high_entropy_system_prompt=PROMPT)
    trainer.train()
    results = tmp_path / "results.json"
    results.write_text(
        json.dumps(
            {
                "per_benchmark": {
                    "gsm8k": {"normal": {"avg_at_k": 0.1, "pass_at_k": 0.2, "entropy_bits": 0.5, "mean_length": 10.0}}
                }
            }
        )
    )
    trainer.push_to_hub(eval_results=str(results))
    files = uploaded["files"]
    assert uploaded["repo_id"] == "me/out"
    assert "model.safetensors" in files
    assert json.loads(files[POLICY_SPLIT_FILE])["modes"]["high_entropy"]["system_prompt"] == PROMPT
    card = files["README.md"].decode()
    assert "## Modes" in card and PROMPT in card and "policy-split" in card and "| gsm8k | normal | 10.00 |" in card
