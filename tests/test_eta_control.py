"""Adaptive eta (beyond the paper): the update rule, its validation, a closed loop, real runs on the tiny model, exact
resume from a checkpoint, two processes, and the constant schedule left as it was."""

import itertools
import json
import math
import os
import subprocess
from types import SimpleNamespace

import pytest
import torch
from processes import free_port, launcher, requires_launcher
from tiny_model import arithmetic_dataset, build_model, length_reward, training_args
from transformers import HfArgumentParser, TrainerState

from policy_split_trl import EtaControllerCallback, PolicySplitGRPOConfig, PolicySplitGRPOTrainer, adaptive_eta_update
from policy_split_trl.hub import policy_split_metadata

HERE = os.path.dirname(__file__)
NAN = float("nan")

# Band [0.4, 0.625] around 0.5 (both bounds exact in binary floating point), factor 2.
RULE = {"target": 0.5, "tolerance": 0.25, "factor": 2.0, "eta_min": 0.001, "eta_max": 0.1}


def rule(eta, kl, he=None, normal=None, **kwargs):
    return adaptive_eta_update(eta, kl, he, normal, **{**RULE, **kwargs})


def rule_from_args(eta, kl, he, normal, args):
    return adaptive_eta_update(
        eta,
        kl,
        he,
        normal,
        target=args.target_kl_high_entropy_normal,
        tolerance=args.eta_target_tolerance,
        factor=args.eta_update_factor,
        eta_min=args.eta_min,
        eta_max=args.eta_max,
        max_entropy_ratio=args.max_entropy_ratio,
    )


# ---------------------------------------------------------------------------------------------------- 1. the rule
@pytest.mark.parametrize(
    "call, expected",
    [
        # KL against the band [0.4, 0.625]
        (lambda: rule(0.03, 0.1), 0.06),  # below: x 2
        (lambda: rule(0.03, 0.5), 0.03),  # inside: unchanged
        (lambda: rule(0.03, 0.4), 0.03),  # the band's bounds are inside
        (lambda: rule(0.03, 0.625), 0.03),
        (lambda: rule(0.03, 0.39), 0.06),
        (lambda: rule(0.03, 0.63), 0.015),
        (lambda: rule(0.03, 1.0), 0.015),  # above: / 2
        (lambda: rule(0.03, -0.01), 0.06),  # a negative Monte-Carlo KL estimate is below any band
        # the ceiling: HE entropy 2.0 > 1.5 x normal 1.0 cuts eta whatever the KL says (below, inside, missing)
        (lambda: rule(0.03, 0.1, 2.0, 1.0, max_entropy_ratio=1.5), 0.015),
        (lambda: rule(0.03, 0.5, 2.0, 1.0, max_entropy_ratio=1.5), 0.015),
        (lambda: rule(0.03, None, 2.0, 1.0, max_entropy_ratio=1.5), 0.015),
        (lambda: rule(0.03, 0.1, 1.4, 1.0, max_entropy_ratio=1.5), 0.06),  # under the ceiling: the band decides
        (lambda: rule(0.03, 0.1, 1.5, 1.0, max_entropy_ratio=1.5), 0.06),  # at the ceiling is not above it
        (lambda: rule(0.03, 0.1, 2.0, 1.0), 0.06),  # no ceiling set: entropies are ignored
        # clamped to [eta_min, eta_max]
        (lambda: rule(0.08, 0.1), 0.1),
        (lambda: rule(0.0015, 1.0), 0.001),
        (lambda: rule(0.0015, 1.0, eta_min=0.0), 0.00075),
        # a missing statistic moves nothing
        (lambda: rule(0.03, None), 0.03),
        (lambda: rule(0.03, NAN), 0.03),
        (lambda: rule(0.03, 0.1, None, 1.0, max_entropy_ratio=1.5), 0.03),  # no increase without the ceiling's check
        (lambda: rule(0.03, 1.0, 1.0, None, max_entropy_ratio=1.5), 0.03),
        (lambda: rule(0.03, 0.1, NAN, 1.0, max_entropy_ratio=1.5), 0.03),
    ],
)
def test_update_rule_hand_computed(call, expected):
    assert call() == expected


# ---------------------------------------------------------------------------------------------------- 2. validation
def make_config(**kwargs):
    base = {"output_dir": "/tmp/ps-eta-config-test", "report_to": "none", "use_cpu": True}
    return PolicySplitGRPOConfig(**{**base, **kwargs})


ADAPTIVE = {"eta_schedule": "adaptive", "target_kl_high_entropy_normal": 0.3}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eta_schedule": "linear"}, "eta_schedule must be one of"),
        ({"eta_schedule": "adaptive"}, "eta_schedule='adaptive' needs target_kl_high_entropy_normal"),
        ({"target_kl_high_entropy_normal": 0.0}, "target_kl_high_entropy_normal must be > 0"),
        ({"target_kl_high_entropy_normal": -1.0}, "target_kl_high_entropy_normal must be > 0"),
        ({"eta_target_tolerance": 0.0}, "eta_target_tolerance must be > 0"),
        ({"eta_update_factor": 1.0}, "eta_update_factor must be > 1"),
        ({"eta_update_factor": 0.5}, "eta_update_factor must be > 1"),
        ({"eta_min": 0.2, "eta_max": 0.1}, "eta_min and eta_max must satisfy 0 <= eta_min <= eta_max"),
        ({"eta_min": -0.1}, "eta_min and eta_max must satisfy"),
        ({"max_entropy_ratio": 1.0}, "max_entropy_ratio must be > 1 or None"),
        ({**ADAPTIVE, "eta": 0.5}, r"eta=0.5 \(the initial adaptive eta\) must lie in \[eta_min, eta_max\]"),
        ({**ADAPTIVE, "eta": 0.0005}, r"must lie in \[eta_min, eta_max\]"),
        ({**ADAPTIVE, "eta": 0.0, "eta_min": 0.0}, "eta_schedule='adaptive' needs eta > 0"),
        ({"eta_max": float("inf")}, "eta_max must be a finite number"),
        ({"target_kl_high_entropy_normal": NAN}, "target_kl_high_entropy_normal must be a finite number"),
        ({"max_entropy_ratio": float("inf")}, "max_entropy_ratio must be a finite number"),
    ],
)
def test_config_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_config(**kwargs)


def test_valid_configs():
    assert make_config().eta_schedule == "constant"
    assert make_config(eta=0.5).eta == 0.5  # the adaptive bounds do not constrain a constant eta
    cfg = make_config(**ADAPTIVE, max_entropy_ratio=None, eta_min=0.0)
    assert (cfg.eta, cfg.eta_min, cfg.eta_max, cfg.max_entropy_ratio) == (0.03, 0.0, 0.1, None)
    parser = HfArgumentParser(PolicySplitGRPOConfig)
    flags = [
        "--output_dir",
        "/tmp/x",
        "--use_cpu",
        "true",
        "--report_to",
        "none",
        "--eta_schedule",
        "adaptive",
        "--target_kl_high_entropy_normal",
        "0.3",
        "--eta_update_factor",
        "1.2",
        "--max_entropy_ratio",
        "2",
    ]
    (cfg,) = parser.parse_args_into_dataclasses(flags)
    assert (cfg.eta_schedule, cfg.target_kl_high_entropy_normal, cfg.eta_update_factor) == ("adaptive", 0.3, 1.2)
    assert cfg.max_entropy_ratio == 2.0
    with pytest.raises(SystemExit):  # argparse rejects a schedule outside the choices
        parser.parse_args_into_dataclasses(["--output_dir", "/tmp/x", "--eta_schedule", "cosine"])


def test_trainer_checks_a_config_changed_after_it_was_built(tmp_path, tokenizer):
    args = make_config(**ADAPTIVE, output_dir=str(tmp_path))
    args.eta = 0.0  # what `apply_method("grpo_rollout_sharing", ...)` does to a built config
    with pytest.raises(ValueError, match="needs eta > 0"):
        PolicySplitGRPOTrainer(
            model=build_model(tokenizer),
            reward_funcs=[length_reward],
            args=args,
            train_dataset=arithmetic_dataset(4),
            processing_class=tokenizer,
        )


def test_policy_split_json_records_the_schedule():
    adaptive = policy_split_metadata(make_config(**ADAPTIVE))["training"]
    assert adaptive["eta_schedule"] == "adaptive" and adaptive["target_kl_high_entropy_normal"] == 0.3
    assert adaptive["eta"] == 0.03 and adaptive["eta_max"] == 0.1 and adaptive["max_entropy_ratio"] == 1.5
    assert "eta_schedule" not in policy_split_metadata(make_config())["training"]  # the paper's method: as before


# ---------------------------------------------------------------------------------------------------- the controller
def controller_args(**kwargs):
    return SimpleNamespace(
        **{
            "eta": 0.03,
            "eta_schedule": "adaptive",
            "target_kl_high_entropy_normal": 0.5,
            "eta_target_tolerance": 0.25,
            "eta_update_factor": 2.0,
            "eta_min": 0.001,
            "eta_max": 0.1,
            "max_entropy_ratio": 1.5,
            **kwargs,
        }
    )


def test_controller_pools_micro_steps_and_updates_once_per_step():
    args = controller_args()
    controller = EtaControllerCallback(0.03)
    # Two micro-steps: KL 0.2 over 10 tokens and 1.0 over 30 -> token mean 0.8 (above [0.4, 0.625]); the mean of the
    # micro-step means would be 0.6 (inside). Entropies: HE 1.2, normal 1.0 (under the 1.5 ceiling).
    controller.record_kl(2.0, 10.0)
    controller.record_kl(30.0, 30.0)
    controller.record_entropies(10.0, 10.0, 12.0, 10.0)
    controller.record_entropies(30.0, 30.0, 36.0, 30.0)
    assert controller.step_statistics() == (0.8, 1.2, 1.0)
    controller.on_step_end(args, None, None)
    assert controller.eta == 0.015
    assert controller.step_statistics() == (None, None, None)  # reset for the next step
    controller.on_step_end(args, None, None)  # a step that measured nothing: unchanged
    assert controller.eta == 0.015
    controller.record_kl(1.0, 10.0)  # KL 0.1: below, but the ceiling is set and no entropy was measured
    controller.on_step_end(args, None, None)
    assert controller.eta == 0.015
    constant = EtaControllerCallback(0.03)
    constant.record_kl(100.0, 1.0)  # far above the band, and entropies under the ceiling: adaptive would cut eta
    constant.record_entropies(1.0, 1.0, 1.0, 1.0)
    constant.on_step_end(controller_args(eta_schedule="constant"), None, None)
    assert constant.eta == 0.03 and constant.step_statistics() == (None, None, None)


def test_controller_state_round_trip_and_restore_at_train_begin():
    args = controller_args()
    controller = EtaControllerCallback(0.03)
    controller.eta = 0.0123
    controller.record_kl(1.5, 3.0)
    saved = json.loads(json.dumps(controller.state()))  # what trainer_state.json holds
    rebuilt = EtaControllerCallback.from_state(saved)  # transformers' restore (restore_callback_states_...=True)
    assert rebuilt.state() == controller.state()
    fresh = EtaControllerCallback(0.03)  # our own restore, whatever that flag says
    fresh.on_train_begin(args, TrainerState(stateful_callbacks={"EtaControllerCallback": saved}), None)
    assert fresh.state() == controller.state()
    untouched = EtaControllerCallback(0.03)  # nothing saved (a fresh run, or a checkpoint from before this feature)
    untouched.on_train_begin(args, TrainerState(), None)
    assert untouched.eta == 0.03
    clamped = EtaControllerCallback(0.03)  # a checkpoint's eta outside this run's bounds is clamped
    clamped.on_train_begin(args, TrainerState(stateful_callbacks={"EtaControllerCallback": saved}), None)
    clamped.on_train_begin(controller_args(eta_min=0.02), TrainerState(stateful_callbacks={"X": {}}), None)
    assert clamped.eta == 0.02


# ---------------------------------------------------------------------------------------------------- 3. closed loop
def closed_loop(eta, steps, gain, ratio_gain=None, **kwargs):
    """Drive the rule with a synthetic monotone response: gap = gain * eta (HE/normal entropy 1 + ratio_gain * eta)."""
    etas, gaps = [], []
    for _ in range(steps):
        gap = gain * eta
        he = None if ratio_gain is None else 1.0 + ratio_gain * eta
        etas.append(eta)
        gaps.append(gap)
        eta = adaptive_eta_update(eta, gap, he, None if he is None else 1.0, **kwargs)
    return etas, gaps


@pytest.mark.parametrize("start", [0.002, 0.1])
def test_closed_loop_gap_enters_the_band_and_stays(start):
    settings = {"target": 0.5, "tolerance": 0.2, "factor": 1.1, "eta_min": 0.001, "eta_max": 0.1}
    low, high = 0.5 / 1.2, 0.5 * 1.2
    etas, gaps = closed_loop(start, 80, gain=10.0, **settings)
    inside = [low <= gap <= high for gap in gaps]
    assert not inside[0]  # starts outside the band
    first = inside.index(True)
    assert first < 60 and all(inside[first:])  # enters within 60 steps and stays
    direction = 1 if start * 10.0 < low else -1  # before, every step moves toward the band
    assert all((b - a) * direction > 0 for a, b in itertools.pairwise(etas[: first + 1]))
    assert len(set(etas[first:])) == 1  # and then eta rests


def test_closed_loop_entropy_ceiling_wins_over_the_kl_target():
    # The KL target wants eta in [0.0417, 0.06] (gap = 10 eta), but the HE/normal entropy ratio 1 + 20 eta passes the
    # 1.5 ceiling at eta = 0.025: eta must stay near the ceiling, never climbing to the target.
    settings = {"target": 0.5, "tolerance": 0.2, "factor": 1.1, "eta_min": 0.001, "eta_max": 0.1}
    etas, gaps = closed_loop(0.002, 120, gain=10.0, ratio_gain=20.0, max_entropy_ratio=1.5, **settings)
    assert max(etas) <= 0.025 * 1.1 and max(etas[60:]) > 0.025 / 1.1**2
    assert all(gap < 0.5 / 1.2 for gap in gaps)


# ---------------------------------------------------------------------------------------------------- real runs
def adaptive_settings(output_dir, **overrides):
    adaptive = {
        "max_steps": 4,
        "max_completion_length": 8,
        "eta": 0.03,
        "eta_schedule": "adaptive",
        "target_kl_high_entropy_normal": 0.004,
        "eta_update_factor": 1.5,
    }
    return training_args(output_dir, **{**adaptive, **overrides})


def train(tokenizer, settings, resume=None, trainer_hook=None):
    trainer = PolicySplitGRPOTrainer(
        model=build_model(tokenizer),
        reward_funcs=[length_reward],
        args=PolicySplitGRPOConfig(**settings),
        train_dataset=arithmetic_dataset(16),
        processing_class=tokenizer,
    )
    if trainer_hook is not None:
        trainer_hook(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def step_logs(trainer):
    return {h["step"]: h for h in trainer.state.log_history if "policy_split/eta" in h}


KL, ENT_HE, ENT_N = (
    "policy_split/kl_high_entropy_normal",
    "policy_split/entropy/high_entropy_context",
    "policy_split/entropy/normal_context",
)


@pytest.mark.parametrize("optimized_step", [True, False], ids=["bonus_from_loss_pass", "bonus_from_generation"])
def test_real_run_eta_follows_the_rule_on_the_logged_statistics(tmp_path, tokenizer, optimized_step):
    settings = adaptive_settings(tmp_path / "out", optimized_step=optimized_step)
    trainer = train(tokenizer, settings)
    args = trainer.args
    logs = step_logs(trainer)
    assert sorted(logs) == [1, 2, 3, 4]
    assert logs[1]["policy_split/eta"] == 0.03 and args.eta == 0.03  # starts at eta; args.eta stays the initial value
    band = (args.target_kl_high_entropy_normal / 1.2, args.target_kl_high_entropy_normal * 1.2)
    etas = [logs[step]["policy_split/eta"] for step in (1, 2, 3, 4)] + [trainer._eta]
    for step in (1, 2, 3, 4):
        log, eta, next_eta = logs[step], etas[step - 1], etas[step]
        # The eta of the next step is the rule applied to this step's logged statistics, exactly.
        assert next_eta == rule_from_args(eta, log[KL], log[ENT_HE], log[ENT_N], args), step
        inflated = log[ENT_HE] > args.max_entropy_ratio * log[ENT_N]
        direction = -1 if inflated or log[KL] > band[1] else (1 if log[KL] < band[0] else 0)
        expected = min(max(eta * args.eta_update_factor**direction, args.eta_min), args.eta_max)
        assert math.isclose(next_eta, expected, rel_tol=1e-12), step
    assert len(set(etas)) > 2  # it moved, more than once


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("eta-resume") / "out"
    settings = adaptive_settings(out, target_kl_high_entropy_normal=0.001, save_strategy="steps", save_steps=2)
    trainer = train(tokenizer, settings)
    return out, step_logs(trainer), trainer._eta_controller.state()


@pytest.mark.parametrize("restore_callback_states", [False, True])
def test_resume_continues_the_controller_exactly(tmp_path, tokenizer, uninterrupted, restore_callback_states):
    out, logs, final_state = uninterrupted
    checkpoint = out / "checkpoint-2"
    with open(checkpoint / "trainer_state.json") as f:
        saved = json.load(f)["stateful_callbacks"]["EtaControllerCallback"]["attributes"]
    assert saved["eta"] == logs[3]["policy_split/eta"]  # the eta that step 3 used
    assert saved["eta"] != 0.03  # not vacuous: a resume that started over from eta would differ

    settings = adaptive_settings(
        tmp_path / "resumed",
        target_kl_high_entropy_normal=0.001,
        save_strategy="steps",
        save_steps=2,
        restore_callback_states_from_checkpoint=restore_callback_states,
    )
    resumed = train(tokenizer, settings, resume=str(checkpoint))
    resumed_logs = step_logs(resumed)
    assert sorted(resumed_logs) == [1, 2, 3, 4]  # steps 1-2 come with the checkpoint's log history
    for step in (3, 4):  # the same statistics (the run itself resumes exactly) and the same eta trajectory
        assert resumed_logs[step][KL] == logs[step][KL]
        assert resumed_logs[step]["policy_split/eta"] == logs[step]["policy_split/eta"]
    assert resumed._eta_controller.state() == final_state
    if restore_callback_states:  # transformers replaced the callback object: the trainer reads the new one
        assert sum(isinstance(cb, EtaControllerCallback) for cb in resumed.callback_handler.callbacks) == 1


def test_save_only_model_checkpoints_keep_the_controller(tmp_path, tokenizer):
    settings = adaptive_settings(
        tmp_path / "out", max_steps=2, save_strategy="steps", save_steps=1, save_only_model=True
    )
    logs = step_logs(train(tokenizer, settings))
    with open(tmp_path / "out" / "checkpoint-1" / "trainer_state.json") as f:
        saved = json.load(f)["stateful_callbacks"]["EtaControllerCallback"]["attributes"]
    assert saved["eta"] == logs[2]["policy_split/eta"] != 0.03
    # No optimizer or RNG state to resume the run exactly, but the controller continues from its saved eta.
    checkpoint = str(tmp_path / "out" / "checkpoint-1")
    resumed = train(tokenizer, {**settings, "output_dir": str(tmp_path / "r")}, resume=checkpoint)
    assert step_logs(resumed)[2]["policy_split/eta"] == saved["eta"]


# ---------------------------------------------------------------------------------------------------- 6. constant
def test_constant_schedule_is_unchanged(tmp_path, tokenizer):
    settings = training_args(tmp_path / "a", max_steps=3, max_completion_length=8, eta=0.03)
    plain = train(tokenizer, settings)
    # Adaptive fields set but unused, and the controller removed: the same run, bit for bit.
    odd = {
        **settings,
        "output_dir": str(tmp_path / "b"),
        "target_kl_high_entropy_normal": 1e-6,
        "eta_update_factor": 3.0,
        "eta_min": 0.5,
        "eta_max": 0.9,
        "max_entropy_ratio": 1.0001,
    }
    bare = train(tokenizer, odd, trainer_hook=lambda t: t.remove_callback(EtaControllerCallback))
    logs = step_logs(plain)
    assert [logs[step]["policy_split/eta"] for step in (1, 2, 3)] == [0.03] * 3
    assert plain._eta == plain.args.eta == 0.03 and plain._eta_controller.eta == 0.03
    assert plain._eta_controller.step_statistics() == (None, None, None)  # nothing recorded
    for a, b in zip(plain.model.parameters(), bare.model.parameters(), strict=True):
        assert torch.equal(a, b)
    bare_logs = step_logs(bare)
    for step in (1, 2, 3):
        assert bare_logs[step]["loss"] == logs[step]["loss"] and bare_logs[step][KL] == logs[step][KL]


# ---------------------------------------------------------------------------------------------------- 5. 2 processes


@requires_launcher("accelerate")
def test_two_processes_hold_the_same_eta(tmp_path):
    result = tmp_path / "result.json"
    cmd = [
        launcher("accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        os.path.join(HERE, "eta_control_run.py"),
        str(result),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if "Warning" not in line and "warnings.warn" not in line]
        raise AssertionError("\n".join(lines[-60:]))
    args = make_config(**adaptive_settings("/tmp/unused"))  # the rule's settings of eta_control_run.py
    for name, data in json.loads(result.read_text()).items():
        assert data["global_step"] == 4, name
        rank0, rank1 = data["per_rank"]
        assert len(rank0["etas"]) == 4 and rank0["etas"] == rank1["etas"], name  # bit-identical on both processes
        assert rank0["state"] == rank1["state"], name
        logs = {h["step"]: h for h in data["logs"]}
        etas = [logs[step]["policy_split/eta"] for step in (1, 2, 3, 4)]
        assert etas[1:] == rank0["etas"][:3], name
        for step, next_eta in zip((1, 2, 3, 4), rank0["etas"], strict=True):  # the rule on the reduced statistics
            log = logs[step]
            assert next_eta == rule_from_args(etas[step - 1], log[KL], log[ENT_HE], log[ENT_N], args), (name, step)
        assert len({0.03, *rank0["etas"]}) > 2, name
