"""The README's Python snippets run as written (the tiny local model stands in for the Hub id)."""

import os
import re

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def snippets():
    with open(README) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.DOTALL)


def test_readme_training_example_runs(tmp_path, tiny_model_path, monkeypatch):
    training, inference, dual_mode = snippets()
    assert '"Qwen/Qwen3-0.6B"' in training and "max_completion_length=1024," in training
    # Same code, CPU-sized: the local tiny model for the Hub id, a few tokens and one step.
    code = training.replace('"Qwen/Qwen3-0.6B"', repr(tiny_model_path)).replace(
        "max_completion_length=1024,",
        "max_completion_length=8, max_steps=1, use_cpu=True, report_to='none',",
    )
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(code, namespace)  # noqa: S102 -- running our own README is the point
    assert namespace["trainer"].state.global_step == 1
    assert "policy_split/high_entropy/rewards/accuracy_reward/mean" in namespace["trainer"].state.log_history[0]

    trainer = namespace["trainer"]
    namespace = {}
    exec(inference, namespace)  # noqa: S102
    assert namespace["messages"][0]["role"] == "system"

    # The inference snippet, on the model the training snippet just trained (saved where the README's path points).
    assert 'DualModeModel.from_pretrained("outputs/quickstart")' in dual_mode
    trainer.save_model("outputs/quickstart")
    namespace = {}
    exec(dual_mode.replace("max_new_tokens=64", "max_new_tokens=4"), namespace)  # noqa: S102
    assert namespace["model"].prompts["high_entropy"] == trainer.args.high_entropy_system_prompt
