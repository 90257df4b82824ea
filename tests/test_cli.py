"""The training CLI: recipes dry-run offline, a real tiny run with CLI overrides, and `accelerate launch` on 2 CPUs."""

import glob
import json
import os
import socket
import subprocess
import sys

import pytest
from trl import GRPOTrainer

from policy_split_trl.methods import METHODS
from policy_split_trl.scripts.train import run
from policy_split_trl.shared_prefix import SharedPrefixMixin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINING_RECIPES = sorted(
    p
    for p in glob.glob(os.path.join(ROOT, "recipes", "**", "*.yaml"), recursive=True)
    if "/accelerate/" not in p and "/compare/" not in p
)
BIN = os.path.dirname(sys.executable)


@pytest.fixture(autouse=True)
def embedded_cache(tmp_path_factory, monkeypatch):
    # One conversion of the embedded model per test session, outside the user's cache.
    monkeypatch.setenv("POLICY_SPLIT_CACHE", str(tmp_path_factory.getbasetemp() / "policy-split-cache"))


def tiny_overrides(tiny_model_path, output_dir, *extra):
    return [
        "--model_name_or_path",
        tiny_model_path,
        "--output_dir",
        str(output_dir),
        "--max_steps",
        "2",
        "--max_completion_length",
        "8",
        "--num_generations",
        "4",
        "--per_device_train_batch_size",
        "4",
        "--per_device_eval_batch_size",
        "8",
        "--num_generations_eval",
        "2",
        "--max_eval_samples",
        "4",
        "--use_cpu",
        "true",
        "--report_to",
        "none",
        *extra,
    ]


def test_recipes_exist():
    names = {os.path.relpath(p, os.path.join(ROOT, "recipes")) for p in TRAINING_RECIPES}
    for size in ("1.7b", "4b", "8b"):
        assert f"paper/qwen3_{size}_policy_split.yaml" in names
        assert f"paper/qwen3_{size}_grpo.yaml" in names
    assert {
        "quickstart.yaml",
        "lora/qwen3_0.6b_lora_policy_split.yaml",
        "lora/qwen3_1.7b_lora_policy_split.yaml",
    } <= names
    # One recipe per baseline and ablation of the comparison; each dry-runs as its method (test below).
    assert {f"baselines/qwen3_1.7b_{m}.yaml" for m in METHODS if m not in ("grpo", "policy_split")} <= names
    accelerate = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "recipes", "accelerate", "*.yaml"))}
    assert accelerate == {
        "single_gpu.yaml",
        "multi_gpu.yaml",
        "deepspeed_zero2.yaml",
        "deepspeed_zero3.yaml",
        "fsdp2.yaml",
        "multi_node.yaml",
    }


@pytest.mark.parametrize("recipe", TRAINING_RECIPES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_recipe_dry_runs_offline(recipe, capsys, recwarn):
    summary = run(["--config", recipe, "--dry_run"])
    out = capsys.readouterr().out
    assert "dry run" in out
    # Every recipe is consistent with its method: nothing it sets is replaced by the method or left unused.
    assert not [str(w.message) for w in recwarn if "--method" in str(w.message)]
    assert summary["num_generations"] == 8
    batch = summary["batch"]
    assert batch["rollouts_per_optimizer_step"] % summary["num_generations"] == 0
    if summary["method"] == "policy_split":
        assert summary["mode_split"]["normal"] + summary["mode_split"]["high_entropy"] == 8
        assert batch["training_rows_per_optimizer_step"] == 2 * batch["rollouts_per_optimizer_step"]
    if "/baselines/" in recipe:
        method = os.path.basename(recipe)[len("qwen3_1.7b_") : -len(".yaml")]
        assert summary["method"] == method
        dual = METHODS[method].dual_mode
        assert batch["training_rows_per_optimizer_step"] == batch["rollouts_per_optimizer_step"] * (
            2 if dual and method != "policy_split_no_sharing" else 1
        )
        if not dual and method != "grpo":  # the method's own settings are shown, at the paper's values
            expected = {
                "forking_tokens": {"top_entropy_quantile": 0.2},
                "entropy_regularization": {"entropy_coef": 0.003},
                "entropy_advantage": {"entropy_advantage_alpha": 0.4, "entropy_advantage_kappa": 2.0},
                "clip_cov": {"clip_cov_ratio": 2e-4, "clip_cov_lb": 1.0, "clip_cov_ub": 5.0},
                "entropy_driven_advantage": {"edge_epsilon": 1e-6, "edge_max_scale": None},
                "asym_grpo": {
                    "asym_beta_pos": 0.9,
                    "asym_beta_neg": 0.4,
                    "asym_correctness_reward": None,
                    "asym_success_threshold": 0.5,
                    "asym_match_grpo_scale": False,
                    "asym_max_abs_advantage": None,
                },
                "polarity_reweighting": {
                    "polarity_diagnostics": True,
                    "polarity_chunk_tokens": 512,
                    "polarity_lambda_max": 0.5,
                    "polarity_ema": 0.9,
                    "polarity_anchor_ratio": 0.8,
                    "polarity_entropy_target": None,
                    "polarity_gamma": 5.0,
                    "polarity_phase": "level",
                    "polarity_slope_window": 5,
                    "polarity_epsilon": 1e-08,
                },
            }[method]
            assert summary["method_settings"] == expected
    if "/paper/" in recipe or "/baselines/" in recipe:
        # 8 GPUs x per-device batch x accumulation = 256 queries x 8 rollouts (the comment in each recipe)
        on_8_gpus = run(["--config", recipe, "--dry_run", "--dry_run_num_processes", "8"])["batch"]
        assert on_8_gpus["processes"] == 8
        assert on_8_gpus["generation_batch_size"] == 2048
        if recipe.endswith("_authors_loop.yaml"):  # 4 optimizer steps of 64 queries per rollout batch, as verl
            assert on_8_gpus["queries_per_optimizer_step"] == 64
            assert summary["bonus"]["loss_aggregation"] == "quarter_token_mean"
            assert summary["bonus"]["eta_placement"] == "inside_clip"
        else:
            assert on_8_gpus["queries_per_optimizer_step"] == 256
            assert on_8_gpus["rollouts_per_optimizer_step"] == 2048
        assert summary["model_status"].startswith("remote, not loaded")  # Hub is unreachable here
        assert summary["dataset_status"].startswith("remote, not loaded")
        assert summary["rewards"] == ["reasoning_math_accuracy_reward"]


def test_dry_run_reads_the_model_without_weights(tiny_model_path, tmp_path, capsys):
    summary = run(
        [
            "--config",
            os.path.join(ROOT, "recipes", "quickstart.yaml"),
            "--dry_run",
            *tiny_overrides(tiny_model_path, tmp_path),
        ]
    )
    assert summary["model_type"] == "qwen3"
    assert summary["parameters"] == summary["trainable_parameters"] > 0
    assert summary["train_samples"] == 1000
    assert summary["optimizer_steps"] == 2
    lora = run(
        [
            "--config",
            os.path.join(ROOT, "recipes", "quickstart.yaml"),
            "--dry_run",
            "--use_peft",
            "true",
            "--lora_target_modules",
            "q_proj",
            "v_proj",
            *tiny_overrides(tiny_model_path, tmp_path),
        ]
    )
    assert 0 < lora["trainable_parameters"] < lora["parameters"]
    assert not os.path.exists(tmp_path / "checkpoint-2")


def test_dry_run_fails_loudly_on_a_missing_local_file(tiny_model_path, tmp_path):
    missing = str(tmp_path / "no_such_file.jsonl")
    with pytest.raises(Exception, match="no_such_file"):
        run(
            [
                "--config",
                os.path.join(ROOT, "recipes", "quickstart.yaml"),
                "--dry_run",
                "--dataset_name",
                missing,
                *tiny_overrides(tiny_model_path, tmp_path),
            ]
        )


def test_cli_trains_from_a_recipe_with_overrides(tiny_model_path, tmp_path, capsys):
    prompt_file = tmp_path / "mode.txt"
    prompt_file.write_text("Explore unusual approaches.\n")
    trainer = run(
        [
            "--config",
            os.path.join(ROOT, "recipes", "quickstart.yaml"),
            *tiny_overrides(
                tiny_model_path,
                tmp_path / "out",
                "--save_strategy",
                "steps",
                "--save_steps",
                "2",
                "--mode_prompt_file",
                str(prompt_file),
                "--eta",
                "0.05",
            ),
        ]
    )
    assert trainer.state.global_step == 2
    assert trainer.args.eta == 0.05 and trainer.args.high_entropy_system_prompt == "Explore unusual approaches."
    assert (tmp_path / "out" / "checkpoint-2" / "model.safetensors").exists()
    assert (tmp_path / "out" / "model.safetensors").exists()
    # mode_report (on in the quickstart): before/after table, JSON and plot
    report = json.loads((tmp_path / "out" / "mode_report.json").read_text())
    assert "eval_policy_split/high_entropy/reward" in report["before"]
    assert "eval_policy_split/high_entropy/reward" in report["after"]
    table = (tmp_path / "out" / "mode_report.md").read_text()
    assert "| reward |" in table and "high-entropy: after" in table
    assert (tmp_path / "out" / "policy_split_metrics.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "1 process(es)" in out and "G=4 rollouts per query (2 normal + 2 high-entropy)" in out


def test_cli_grpo_baseline(tiny_model_path, tmp_path):
    trainer = run(
        [
            "--config",
            os.path.join(ROOT, "recipes", "quickstart.yaml"),
            "--method",
            "grpo",
            "--mode_report",
            "false",
            *tiny_overrides(tiny_model_path, tmp_path),
        ]
    )
    # TRL's GRPOTrainer with the shared-prefix log-prob passes (on for every method by default: fair comparisons).
    assert type(trainer).__mro__[1:3] == (SharedPrefixMixin, GRPOTrainer)
    assert trainer.state.global_step == 2
    assert not any(k.startswith("policy_split/") for h in trainer.state.log_history for k in h)


def test_console_script_is_installed():
    exe = os.path.join(BIN, "policy-split-train")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for flag in ("--eta", "--kappa", "--dry_run", "--reward_funcs", "--max_train_samples", "--mode_prompt_file"):
        assert flag in proc.stdout


def test_module_dry_run_in_a_fresh_process():
    recipe = os.path.join(ROOT, "recipes", "paper", "qwen3_8b_policy_split.yaml")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "policy_split_trl.scripts.train", "--config", recipe, "--dry_run"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "remote, not loaded" in proc.stdout and "Qwen/Qwen3-8B" in proc.stdout


def test_accelerate_launch_two_processes(tiny_model_path, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        os.path.join(BIN, "accelerate"),
        "launch",
        "--config_file",
        os.path.join(ROOT, "recipes", "accelerate", "multi_gpu.yaml"),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(port),
        "-m",
        "policy_split_trl.scripts.train",
        "--config",
        os.path.join(ROOT, "recipes", "quickstart.yaml"),
        "--mode_report",
        "false",
        *tiny_overrides(
            tiny_model_path,
            tmp_path / "out",
            "--save_strategy",
            "steps",
            "--save_steps",
            "2",
            "--per_device_train_batch_size",
            "2",
        ),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "on 2 process(es)" in proc.stdout
    assert (tmp_path / "out" / "checkpoint-2").is_dir()


def test_console_script_exits_zero_after_training(tiny_model_path, tmp_path):
    exe = os.path.join(BIN, "policy-split-train")
    cmd = [
        exe,
        "--config",
        os.path.join(ROOT, "recipes", "quickstart.yaml"),
        "--mode_report",
        "false",
        *tiny_overrides(tiny_model_path, tmp_path / "out", "--max_steps", "1"),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Model saved to" in proc.stdout
    # The run's logged metrics next to the model (no checkpoint was saved): one training step, then the summary.
    with open(tmp_path / "out" / "log_history.json") as f:
        history = json.load(f)["log_history"]
    assert [entry["step"] for entry in history] == [1, 1] and "loss" in history[0] and "train_runtime" in history[1]
