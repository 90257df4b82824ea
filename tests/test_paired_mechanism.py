"""
The paired mechanism test (`policy_split_trl.benchmarks.paired_mechanism`): its statistics against hand values, and the
test itself through the real trainer on the tiny model: from one model state and one set of rollouts per batch, the
bonus (eta > 0, either placement) raises the HE-context entropy and KL(pi_HE || pi) of a held-out probe, compared
with the same update at eta = 0; exact controls (eta = 0 twice, A = 0 everywhere) show an effect of exactly 0, and an
eta that the trainer ignores fails loudly.
"""

import json
import math

import pytest
import torch
from tiny_model import arithmetic_dataset, build_model, build_tokenizer, length_reward, training_args

from policy_split_trl import PolicySplitGRPOConfig, PolicySplitGRPOTrainer
from policy_split_trl import trainer as trainer_module
from policy_split_trl.benchmarks import paired_mechanism as pm
from policy_split_trl.contexts import HE_KEY_PREFIX
from policy_split_trl.probe import ModeGapProbe

G = 4
QUERIES = 2
# The tiny model's final norm scaled up: logits peaked enough (entropies ~2.3 / 1.2 nats, KL between the modes ~0.15)
# while the residual stream still carries the context. Scaling the tied embeddings instead (tests/distributed_matrix's
# EMBED_SCALE) peaks the logits too, but drowns the context in the token's own embedding: both modes then coincide
# (KL ~1e-5 nats) and the KL has nothing to move.
NORM_SCALE = 15.0
# Plain SGD at 1e-4 is first order here: the effects scale with the learning rate (1e-4 and 3e-4 give the same d, ~7;
# 1e-2 leaves the linear regime) and stay ~1e3 x above float32 noise.
LEARNING_RATE = 1e-4
NUM_BATCHES = 8


# ------------------------------------------------------------------------------------------------------ statistics
def test_paired_effects_are_differences_per_batch():
    assert pm.paired_effects([3.0, 5.0, 4.0], [1.0, 1.0, 2.0]) == [2.0, 4.0, 2.0]
    with pytest.raises(ValueError, match="same batches"):
        pm.paired_effects([1.0, 2.0], [1.0])


@pytest.mark.parametrize(
    "df, quantile",  # two-sided 95% (p = 0.975) from a printed t table
    [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (5, 2.5706), (10, 2.2281), (30, 2.0423), (100, 1.9840)],
)
def test_student_t_quantile_matches_the_table(df, quantile):
    assert pm.student_t_quantile(0.975, df) == pytest.approx(quantile, abs=1e-4)
    assert pm.student_t_quantile(0.025, df) == pytest.approx(-quantile, abs=1e-4)


def test_student_t_cdf_exact_forms():
    assert pm.student_t_cdf(0.0, 7) == 0.5
    assert pm.student_t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + atan(1)/pi
    assert pm.student_t_cdf(2.0, 2) == pytest.approx(0.5 + 2.0 / (2.0 * math.sqrt(6.0)))  # 1/2 + t / (2 sqrt(2 + t^2))
    assert pm.student_t_quantile(0.95, 7) == pytest.approx(1.8946, abs=1e-4)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="df"):
            pm.student_t_cdf(1.0, bad)


def test_t_interval_against_hand_values():
    # Effects 2, 4, 2: mean 8/3, sd sqrt(4/3), se sd / sqrt(3) = 2/3, t(0.975, 2) = 4.3027 -> +-2.8685; d = 2.3094.
    out = pm.t_interval([2.0, 4.0, 2.0])
    assert out["n"] == 3
    assert out["mean"] == pytest.approx(8 / 3)
    assert out["sd"] == pytest.approx(math.sqrt(4 / 3))
    assert out["se"] == pytest.approx(2 / 3)
    assert out["low"] == pytest.approx(8 / 3 - 4.3027 * 2 / 3, abs=1e-4)
    assert out["high"] == pytest.approx(8 / 3 + 4.3027 * 2 / 3, abs=1e-4)
    assert out["effect_size"] == pytest.approx((8 / 3) / math.sqrt(4 / 3))
    # 90%: t(0.95, 2) = 2.9200.
    assert pm.t_interval([2.0, 4.0, 2.0], confidence=0.9)["low"] == pytest.approx(8 / 3 - 2.9200 * 2 / 3, abs=1e-4)


def test_t_interval_edge_cases():
    zeros = pm.t_interval([0.0, 0.0, 0.0])
    assert (zeros["mean"], zeros["low"], zeros["high"], zeros["effect_size"]) == (0.0, 0.0, 0.0, 0.0)
    assert pm.standardized_effect([1.5, 1.5]) == math.inf
    one = pm.t_interval([0.3])
    assert one["mean"] == 0.3 and one["low"] == -math.inf and one["high"] == math.inf
    with pytest.raises(ValueError):
        pm.t_interval([])


def test_summarize_pairs_every_setting_with_the_baseline():
    settings = pm.default_settings(0.03)
    records = [
        {"deltas": {"eta0": {"m": 1.0}, "inside_clip": {"m": 3.0}, "outside_clip": {"m": 1.0}}},
        {"deltas": {"eta0": {"m": 2.0}, "inside_clip": {"m": 6.0}, "outside_clip": {"m": 2.0}}},
        {"deltas": {"eta0": {"m": -1.0}, "inside_clip": {"m": 1.0}, "outside_clip": {"m": -1.0}}},
    ]
    summary = pm.summarize(records, settings, metrics=["m"])
    assert summary["batches"] == 3
    assert summary["deltas"]["eta0"]["m"]["mean"] == pytest.approx(2 / 3)
    # inside_clip effects 2, 4, 2 (the hand values above); outside_clip effects all 0.
    assert summary["effects"]["inside_clip"]["m"]["mean"] == pytest.approx(8 / 3)
    assert summary["effects"]["inside_clip"]["m"]["low"] == pytest.approx(8 / 3 - 4.3027 * 2 / 3, abs=1e-4)
    assert summary["effects"]["outside_clip"]["m"]["mean"] == 0.0
    assert "eta0" not in summary["effects"]
    with pytest.raises(ValueError, match="baseline"):
        pm.summarize(records, [pm.UpdateSetting("a", 0.1)], metrics=["m"])


# ------------------------------------------------------------------------------------- the test, on the tiny model
@pytest.fixture(scope="module")
def one_thread():
    # The tiny model's ops are far too small for a second thread to pay off; on a busy machine it costs several x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    """A peaked tiny model in a Policy Split trainer (on-policy), training batches and a held-out probe."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    with torch.no_grad():
        model.model.norm.weight.mul_(NORM_SCALE)
    heldout = [r["prompt"] for r in arithmetic_dataset(6, seed=99)]
    # Training questions: none of the held-out ones (the probe measures generalization of the update, not recall).
    rows = [r for r in arithmetic_dataset(200, seed=0) if r["prompt"] not in heldout][: QUERIES * 3 * NUM_BATCHES]
    # `length_reward` is dense: every group has reward variance, so A != 0 and the bonus acts on every batch.
    args = PolicySplitGRPOConfig(
        **training_args(
            tmp_path_factory.mktemp("paired"),
            num_generations=G,
            per_device_train_batch_size=QUERIES * G,
            max_completion_length=12,
            steps_per_generation=1,
            num_iterations=1,
            beta=0.0,
            loss_type="dapo",
            disable_tqdm=True,
        )
    )
    trainer = PolicySplitGRPOTrainer(
        model=model,
        reward_funcs=[length_reward],
        args=args,
        train_dataset=arithmetic_dataset(8),
        processing_class=tokenizer,
    )
    probe = ModeGapProbe.sample(
        model, tokenizer, heldout, args.high_entropy_system_prompt, num_per_mode=2, max_new_tokens=12, seed=0
    )
    batches = [[r for r in rows[QUERIES * b : QUERIES * (b + 1)] for _ in range(G)] for b in range(3 * NUM_BATCHES)]
    return trainer, probe, batches


def test_bonus_raises_he_entropy_and_kl_for_both_placements(setup):
    trainer, probe, batches = setup
    before = pm.snapshot(trainer.model)
    eta_before = (trainer.args.eta, trainer.args.eta_placement)
    # A second eta = 0 update is a placebo: paired with the first, its effect must be exactly 0 (same weights, fresh
    # optimizer, a copy of the same batch, the same random state).
    settings = [*pm.default_settings(0.03), pm.UpdateSetting("placebo", 0.0)]
    result = pm.run_paired_mechanism(
        trainer, probe, batches[:NUM_BATCHES], settings, learning_rate=LEARNING_RATE, progress=None
    )
    summary = result["summary"]
    assert summary["batches"] == NUM_BATCHES
    for placement in ("inside_clip", "outside_clip"):
        for metric in pm.CLAIMED_METRICS:
            effect = summary["effects"][placement][metric]
            assert effect["mean"] > 0 and effect["low"] > 0, (placement, metric, effect)
        assert summary["claim_holds"][placement] == dict.fromkeys(pm.CLAIMED_METRICS, True)
    for record in result["records"]:
        assert record["deltas"]["placebo"] == record["deltas"]["eta0"]
        assert record["updates"]["placebo"]["distance_to_baseline"] == 0.0
        assert record["updates"]["eta0"]["bonus_abs_mean"] == 0.0
        for setting in settings:  # the eta the trainer reports in force (where it reports one) is the one set
            in_force = record["updates"][setting.name]["eta_in_force"]
            assert math.isnan(in_force) or in_force == setting.eta
        for placement in ("inside_clip", "outside_clip"):
            update = record["updates"][placement]
            assert update["bonus_abs_mean"] > 0 and update["distance_to_baseline"] > 0
    # Token by token, |clip(eta B, +-|A|/kappa)| >= eta |clip(B, +-|A|/kappa)| for eta < 1: eta inside the clip gives
    # the larger bonus.
    assert summary["updates"]["inside_clip"]["bonus_abs_mean"] > summary["updates"]["outside_clip"]["bonus_abs_mean"]
    # The model is back at theta0 and the trainer's own eta untouched.
    assert all(torch.equal(p, q) for p, q in zip(pm.snapshot(trainer.model), before, strict=True))
    assert (trainer.args.eta, trainer.args.eta_placement) == eta_before


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_control_no_advantage_no_effect(setup, optimizer):
    """With A = 0 everywhere, Eq. 3 clips the bonus to |A|/kappa = 0: with eta > 0 the update is exactly the eta = 0
    one (no gradient: SGD makes no step, AdamW at most the same weight decay), so the effect is exactly 0."""
    trainer, probe, batches = setup
    batch = pm.generate_batch(trainer, batches[0], seed=0)
    for key in ("advantages", HE_KEY_PREFIX + "advantages"):
        batch[key] = torch.zeros_like(batch[key])
    theta0 = pm.snapshot(trainer.model)
    record = pm.paired_batch(
        trainer,
        batch,
        probe,
        pm.default_settings(0.03),
        theta0,
        probe.measure(trainer.model),
        optimizer=optimizer,
        learning_rate=1e-3,
    )
    for placement in ("inside_clip", "outside_clip"):
        assert record["deltas"][placement] == record["deltas"]["eta0"]
        assert record["updates"][placement]["distance_to_baseline"] == 0.0
        assert record["updates"][placement]["bonus_abs_mean"] == 0.0
        assert record["updates"][placement]["step_norm"] == record["updates"]["eta0"]["step_norm"]


def test_an_ignored_eta_fails_loudly(setup, monkeypatch):
    trainer, probe, batches = setup
    original = trainer_module.entropy_regularized_advantages

    def ignore_eta(advantages, normalized, eta, kappa, eta_placement):
        return original(advantages, normalized, 0.0, kappa, eta_placement)

    monkeypatch.setattr(trainer_module, "entropy_regularized_advantages", ignore_eta)
    batch = pm.generate_batch(trainer, batches[0], seed=0)
    theta0 = pm.snapshot(trainer.model)
    with pytest.raises(RuntimeError, match="does not follow trainer.args.eta"):
        pm.paired_batch(trainer, batch, probe, pm.default_settings(0.03), theta0, probe.measure(trainer.model))
    pm.restore(trainer.model, theta0)
    # An update identical to the baseline's, although a bonus was logged, fails too; so does another eta in force.
    with pytest.raises(RuntimeError, match="identical to the eta = 0 update"):
        pm._check_eta_followed(
            pm.UpdateSetting("x", 0.03), {"bonus_abs_mean": 0.01, "distance_to_baseline": 0.0}, True
        )
    with pytest.raises(RuntimeError, match="reports eta = 0.05 in force"):
        pm._check_eta_followed(pm.UpdateSetting("x", 0.03), {"eta_in_force": 0.05, "bonus_abs_mean": 0.01}, True)


def test_check_trainer_rejects_what_makes_the_generation_step_depend_on_eta():
    class Args:
        num_iterations, steps_per_generation, gradient_accumulation_steps = 2, 1, 1
        optimized_step, bonus_from_loss_pass, rollout_sharing, normal_eta = True, False, True, 0.0
        eta_schedule = "adaptive"

    class Trainer:
        args, use_vllm = Args(), False

    with pytest.raises(ValueError, match=r"num_iterations=2 \(needs 1\).*bonus_from_loss_pass=False.*eta_schedule"):
        pm.check_trainer(Trainer())


def test_resume_skips_finished_batches_and_refuses_other_settings(setup, tmp_path):
    trainer, probe, batches = setup
    path = str(tmp_path / "batches.jsonl")
    settings = pm.default_settings(0.03, ["inside_clip"])
    kwargs = {"learning_rate": LEARNING_RATE, "results_path": path, "run_settings": {"task": "tiny"}}
    first = pm.run_paired_mechanism(trainer, probe, batches[:2], settings, progress=None, **kwargs)
    with open(path) as f:
        assert [json.loads(line)["type"] for line in f] == ["header", "batch", "batch"]
    # A crash in the middle of a line: the cut line is dropped, the batch before it kept.
    with open(path, "a") as f:
        f.write('{"type": "batch", "batch": 2, "del')
    lines = []
    second = pm.run_paired_mechanism(trainer, probe, batches[:3], settings, progress=lines.append, **kwargs)
    assert lines[0].startswith("resuming") and sum("batch 3/3" in line for line in lines) == 1
    assert second["records"][:2] == json.loads(json.dumps(first["records"]))
    assert [r["batch"] for r in second["records"]] == [0, 1, 2]
    # Fewer batches than saved: the first ones only, nothing computed.
    assert (
        len(
            pm.run_paired_mechanism(trainer, probe, batches[:3], settings, progress=None, num_batches=1, **kwargs)[
                "records"
            ]
        )
        == 1
    )
    with pytest.raises(ValueError, match=r"learning_rate: 0.0001 there, 0.001 now"):
        pm.run_paired_mechanism(
            trainer, probe, batches[:3], settings, progress=None, **{**kwargs, "learning_rate": 1e-3}
        )


def test_uninformative_batches_are_skipped_and_recorded(setup, tmp_path, monkeypatch):
    trainer, probe, batches = setup
    real = pm.generate_batch

    def every_other_uninformative(trainer, rows, seed):
        batch = real(trainer, rows, seed)
        if seed % 2 == 0:
            for key in ("advantages", HE_KEY_PREFIX + "advantages"):
                batch[key] = torch.zeros_like(batch[key])
        return batch

    monkeypatch.setattr(pm, "generate_batch", every_other_uninformative)
    path = str(tmp_path / "batches.jsonl")
    result = pm.run_paired_mechanism(
        trainer,
        probe,
        batches[:4],
        pm.default_settings(0.03, ["outside_clip"]),
        learning_rate=LEARNING_RATE,
        num_batches=2,
        results_path=path,
        progress=None,
    )
    assert result["skipped"] == [0, 2] and [r["batch"] for r in result["records"]] == [1, 3]
    assert result["summary"]["skipped_uninformative"] == 2
    with open(path) as f:
        assert [json.loads(line)["type"] for line in f] == ["header", "skipped", "batch", "skipped", "batch"]


def test_cli_end_to_end(tiny_model_path, tmp_path, capsys):
    out = tmp_path / "paired"
    argv = [
        "--model",
        tiny_model_path,
        "--num_batches",
        "2",
        "--num_generations",
        "4",
        "--max_completion_length",
        "8",
        "--probe_prompts",
        "2",
        "--probe_samples_per_mode",
        "1",
        "--probe_max_new_tokens",
        "8",
        "--keep_uninformative",
        "--output_dir",
        str(out),
    ]
    result = pm.main(argv)
    printed = capsys.readouterr().out
    assert "| inside_clip | entropy, HE context |" in printed and "| outside_clip | KL(pi_HE ‖ pi) |" in printed
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"]["batches"] == 2 == result["summary"]["batches"]
    assert (out / "results.md").exists() and (out / "paired_mechanism.png").exists()
    pm.main(argv)
    assert "resuming" in capsys.readouterr().out
    with pytest.raises(ValueError, match="max_completion_length: 8 there, 6 now"):
        pm.main([*argv[:7], "6", *argv[8:]])


def test_arithmetic_prompts_are_held_out_and_stable():
    train, heldout = pm.arithmetic_prompts(40, 8, seed=0)
    keys = [json.dumps(r["prompt"]) for r in train]
    assert len(set(keys)) == 40 and not set(keys) & {json.dumps(r["prompt"]) for r in heldout}
    more, same_heldout = pm.arithmetic_prompts(80, 8, seed=0)
    assert more[:40] == train and same_heldout == heldout


def test_check_resumable_names_every_difference():
    header = {"settings": {"a": 1, "num_batches": 3}, "probe_fingerprint": "x", "metrics_theta0": {"m": 1.0}}
    # More batches, and theta0's metrics within float noise: resumable.
    pm.check_resumable(header, {"a": 1, "num_batches": 5}, "x", "f.jsonl", {"m": 1.00001})
    with pytest.raises(ValueError, match="a: 1 there, 2 now"):
        pm.check_resumable(header, {"a": 2}, "x", "f.jsonl", {"m": 1.0})
    with pytest.raises(ValueError, match="probe's sequences differ"):
        pm.check_resumable(header, {"a": 1}, "y", "f.jsonl", {"m": 1.0})
    with pytest.raises(ValueError, match="theta0's probe metrics differ"):
        pm.check_resumable(header, {"a": 1}, "x", "f.jsonl", {"m": 1.1})
