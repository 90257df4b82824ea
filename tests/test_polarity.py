"""Entropy polarity (after arXiv 2605.11775) and `polarity_reweighting` (our rule, SEED_METHODS.md §B.2.4): the math
against hand computations and finite differences, the full-vocabulary pass against a dense computation, the
controller, real runs (standalone and composed with Policy Split), exact resume, two processes."""

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

from policy_split_trl.advantages import (
    distributional_correction,
    entropy_polarity,
    full_vocab_token_statistics,
    polarity_branch_weights,
    polarity_ema,
    polarity_phase_level,
    polarity_phase_slope,
    pressure_scale,
    sampled_token_contribution,
)
from policy_split_trl.polarity import (
    POLARITY_SHIFT_KEYS,
    PolarityArguments,
    PolarityController,
    PolarityPolicySplitMixin,
    PolarityReweightingGRPOConfig,
    PolarityReweightingGRPOTrainer,
    full_vocab_polarity_pass,
)

HERE = os.path.dirname(__file__)


# ---------------------------------------------------------------------------------------------------- 1. the math
def test_sampled_token_contribution_hand_value():
    # p = 0.5, H = ln 2 (a fair coin): S = 0.5 (ln 0.5 + ln 2) = 0; p = 0.25, H = 1: S = 0.25 (ln 0.25 + 1).
    logps = torch.tensor([math.log(0.5), math.log(0.25)], dtype=torch.float64)
    entropies = torch.tensor([math.log(2.0), 1.0], dtype=torch.float64)
    expected = torch.tensor([0.0, 0.25 * (math.log(0.25) + 1.0)], dtype=torch.float64)
    torch.testing.assert_close(sampled_token_contribution(logps, entropies), expected, rtol=0, atol=1e-15)


def test_full_vocab_statistics_hand_values():
    # pi = (0.5, 0.25, 0.25): H = 1.5 ln 2; C = sum pi^2 (ln pi + H).
    probs = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64)
    logps, entropy, correction = full_vocab_token_statistics(probs.log(), torch.tensor([1]))
    h = 1.5 * math.log(2)
    c = 0.25 * (math.log(0.5) + h) + 2 * 0.0625 * (math.log(0.25) + h)
    assert logps.item() == pytest.approx(math.log(0.25), abs=1e-15)
    assert entropy.item() == pytest.approx(h, abs=1e-15)
    assert correction.item() == pytest.approx(c, abs=1e-15)
    # The uniform distribution: C = 0 (no covariance); a -inf logit (pi = 0) contributes nothing, never NaN.
    assert distributional_correction(torch.zeros(1, 7, dtype=torch.float64)).item() == pytest.approx(0, abs=1e-15)
    masked = torch.tensor([[0.0, 1.0, float("-inf")]])
    _, h2, c2 = full_vocab_token_statistics(masked)
    _, h3, c3 = full_vocab_token_statistics(masked[:, :2])
    assert torch.isfinite(c2).all() and torch.allclose(c2, c3) and torch.allclose(h2, h3)


def test_correction_is_the_covariance_and_non_negative():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 40, generator=gen, dtype=torch.float64) * 3
    probs = logits.softmax(-1)
    logp = logits.log_softmax(-1)
    cov = (probs * probs * logp).sum(-1) - (probs * probs).sum(-1) * (probs * logp).sum(-1)
    correction = distributional_correction(logits)
    torch.testing.assert_close(correction, cov, rtol=1e-10, atol=1e-12)
    assert (correction >= -1e-15).all()
    assert distributional_correction(logits.float()).dtype == torch.float32


def test_polarity_predicts_the_sign_of_the_entropy_change():
    """Finite differences (SEED_METHODS §B.2.2): a logit step eta A (e_a - pi) changes H by about -eta A D."""
    gen = torch.Generator().manual_seed(1)
    agree, draws, eta = 0, 2000, 1e-4
    for _ in range(draws):
        vocab = int(torch.randint(3, 51, (1,), generator=gen))
        logits = torch.randn(vocab, generator=gen, dtype=torch.float64) * 2
        token = int(torch.randint(vocab, (1,), generator=gen))
        advantage = float(torch.randn(1, generator=gen, dtype=torch.float64))
        logp, h, c = full_vocab_token_statistics(logits.unsqueeze(0), torch.tensor([token]))
        d = sampled_token_contribution(logp, h) - c
        polarity = entropy_polarity(torch.tensor([advantage], dtype=torch.float64), d.unsqueeze(0))
        step = eta * advantage * (torch.nn.functional.one_hot(torch.tensor(token), vocab) - logits.softmax(-1))
        _, h_after, _ = full_vocab_token_statistics((logits + step).unsqueeze(0))
        realized = float(h_after - h)
        agree += (realized > 0) == (float(polarity) > 0)
        assert realized == pytest.approx(eta * float(polarity), rel=1e-2, abs=1e-12)
    assert agree / draws >= 0.99


def test_branch_weights_keep_the_sign_and_conserve_pressure():
    advantages = torch.tensor([1.0, -2.0, 0.0])
    direction = torch.tensor([[0.3, -0.2, 1e-10], [0.1, -0.4, 0.0], [0.5, -0.5, 0.2]])
    polarity = entropy_polarity(advantages, direction)
    # Row 0 (A = 1): Pi = -D = (-0.3, 0.2, -1e-10); row 1 (A = -2): Pi = 2D = (0.2, -0.8, 0); row 2 (A = 0): Pi = 0.
    torch.testing.assert_close(polarity, torch.tensor([[-0.3, 0.2, -1e-10], [0.2, -0.8, 0.0], [0.0, 0.0, 0.0]]))
    omega = polarity_branch_weights(polarity, 0.5)
    torch.testing.assert_close(omega, torch.tensor([[0.5, 1.5, 1.0], [1.5, 0.5, 1.0], [1.0, 1.0, 1.0]]))
    assert (omega > 0).all()
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    magnitude = advantages.abs().unsqueeze(1) * mask
    # sum |A| m = 3 + 4 = 7; sum |A| omega m = (0.5 + 1.5 + 1) + 2 (1.5 + 0.5) = 7: c = 1.
    c = pressure_scale(float((magnitude * omega).sum()), float(magnitude.sum()))
    assert c == 1.0
    omega2 = polarity_branch_weights(polarity, -0.25)  # sum |A| omega m = (1.25 + 0.75 + 1) + 2 (0.75 + 1.25) = 7
    reweighted = advantages.unsqueeze(1) * pressure_scale(float((magnitude * omega2).sum()), 7.0) * omega2
    assert float((reweighted.abs() * mask).sum()) == pytest.approx(7.0)
    nonzero = advantages.unsqueeze(1).expand_as(reweighted) != 0
    assert torch.equal(
        torch.sign(reweighted)[nonzero], torch.sign(advantages.unsqueeze(1).expand_as(reweighted))[nonzero]
    )
    # An unbalanced batch: sum |A| m = 2, sum |A| omega m = 1.5 + 1.5 = 3 -> c = 2/3.
    assert pressure_scale(3.0, 2.0) == pytest.approx(2 / 3)
    assert pressure_scale(0.0, 0.0) == 1.0


def test_phase_signals_hand_values():
    assert polarity_ema(None, 2.0, 0.9) == 2.0
    assert polarity_ema(2.0, 1.0, 0.9) == pytest.approx(1.9)
    assert polarity_phase_level(0.8, 0.8, 5.0) == 0.0
    assert polarity_phase_level(0.4, 0.8, 5.0) == pytest.approx(math.tanh(2.5))  # below the reference: expand
    assert polarity_phase_level(1.6, 0.8, 5.0) == pytest.approx(math.tanh(-5.0))
    assert polarity_phase_slope([1.0, 0.9], 2, 1.0, 5.0) == 0.0  # window not full
    assert polarity_phase_slope([1.0, 0.9, 0.8], 2, 1.0, 5.0) == pytest.approx(-math.tanh(5.0 * -0.2 / 2))


def _args(**overrides):
    defaults = {f: getattr(PolarityArguments, f) for f in PolarityArguments.__dataclass_fields__}
    return SimpleNamespace(**{**defaults, **overrides})


def test_controller_moves_lambda_up_when_entropy_falls_below_the_reference():
    args = _args()
    controller = PolarityController()
    track = controller.update("policy", 20.0, 10.0, args)  # H-_0 = 2: anchor 2, reference 1.6, H~ = 2 > 1.6
    assert track["anchor"] == 2.0 and track["smoothed"] == 2.0
    assert track["lam"] == pytest.approx(0.5 * math.tanh(5 * (1.6 - 2.0) / 1.6)) and track["lam"] < 0
    lams = [track["lam"]]
    for _ in range(30):  # the entropy collapses to 0.5 nats
        lams.append(controller.update("policy", 5.0, 10.0, args)["lam"])
    assert lams[-1] > 0 and all(b >= a for a, b in itertools.pairwise(lams))  # up, monotonically
    smoothed = 2.0
    for _ in range(30):
        smoothed = 0.9 * smoothed + 0.1 * 0.5
    assert controller.tracks["policy"]["smoothed"] == pytest.approx(smoothed)
    before = dict(controller.tracks["policy"])
    controller.update("policy", 0.0, 0.0, args)  # no tokens: nothing moves
    assert controller.tracks["policy"] == before
    # An absolute target and the slope option.
    target = PolarityController().update("policy", 20.0, 10.0, _args(polarity_entropy_target=4.0))
    assert target["lam"] == pytest.approx(0.5 * math.tanh(5 * (4.0 - 2.0) / 4.0))
    slope = PolarityController()
    for value in (2.0, 1.8, 1.6):
        track = slope.update(
            "policy", value, 1.0, _args(polarity_phase="slope", polarity_slope_window=2, polarity_ema=0.0)
        )
    assert track["lam"] == pytest.approx(-0.5 * math.tanh(5 * (1.6 - 2.0) / (2 * 1.6))) and track["lam"] > 0


def test_controller_state_round_trip():
    args = _args()
    controller = PolarityController(("normal_context", "high_entropy_context"))
    controller.update("normal_context", 3.0, 2.0, args)
    controller.update("high_entropy_context", 5.0, 2.0, args)
    restored = PolarityController(("normal_context", "high_entropy_context"))
    state = SimpleNamespace(stateful_callbacks={"PolarityController": json.loads(json.dumps(controller.state()))})
    restored.on_train_begin(None, state, None)
    assert restored.tracks == controller.tracks


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"polarity_lambda_max": 1.0}, "polarity_lambda_max must be in"),
        ({"polarity_lambda_max": -0.1}, "polarity_lambda_max must be in"),
        ({"polarity_lambda_max": float("nan")}, "polarity_lambda_max must be a finite"),
        ({"polarity_ema": 1.0}, "polarity_ema"),
        ({"polarity_anchor_ratio": 0.0}, "polarity_anchor_ratio"),
        ({"polarity_entropy_target": -1.0}, "polarity_entropy_target"),
        ({"polarity_entropy_target": float("inf")}, "polarity_entropy_target"),
        ({"polarity_gamma": 0.0}, "polarity_gamma"),
        ({"polarity_phase": "trend"}, "polarity_phase must be one of"),
        ({"polarity_slope_window": 0}, "polarity_slope_window"),
        ({"polarity_chunk_tokens": 0}, "polarity_chunk_tokens"),
        ({"polarity_epsilon": -1.0}, "polarity_epsilon"),
    ],
)
def test_config_validation_names_the_field(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        PolarityReweightingGRPOConfig(str(tmp_path), use_cpu=True, **overrides)


def test_policy_split_config_rejects_an_unknown_context(tmp_path):
    from policy_split_trl import PolicySplitGRPOConfig

    with pytest.raises(ValueError, match="polarity_reweighting must be one of"):
        PolicySplitGRPOConfig(str(tmp_path), use_cpu=True, polarity_reweighting="he")


# ---------------------------------------------------------------------------------- 2. the full-vocabulary pass
@pytest.mark.parametrize("chunk_tokens, batch_size", [(1, None), (3, 2), (512, 1), (512, None)])
def test_chunked_pass_equals_a_dense_computation(tokenizer, chunk_tokens, batch_size):
    model = build_model(tokenizer).double().eval()
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt_ids = torch.randint(3, vocab, (3, 5), generator=gen)
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    completion_ids = torch.randint(3, vocab, (3, 4), generator=gen)
    completion_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    temperature = 0.7
    out = full_vocab_polarity_pass(
        model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature, chunk_tokens, batch_size
    )
    with torch.no_grad():
        logits = (
            model(
                input_ids=torch.cat([prompt_ids, completion_ids], 1),
                attention_mask=torch.cat([prompt_mask, completion_mask], 1),
            ).logits[:, -5:-1]
            / temperature
        )
    logp_all = logits.log_softmax(-1)
    probs = logp_all.exp()
    entropy = -(probs * logp_all).sum(-1)
    correction = (probs**2 * (logp_all + entropy.unsqueeze(-1))).sum(-1)
    logps = logp_all.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    m = completion_mask.double()
    assert out["logps"].dtype == torch.float64
    torch.testing.assert_close(out["logps"], logps * m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["entropies"], entropy * m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["correction"], correction * m, rtol=1e-12, atol=1e-12)
    s = logps.exp() * (logps + entropy)
    torch.testing.assert_close(out["direction"], (s - correction) * m, rtol=1e-12, atol=1e-12)


def test_pass_applies_a_lora_adapter(tokenizer):
    peft = pytest.importorskip("peft")
    model = build_model(tokenizer).double().eval()
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    ids, mask = torch.randint(3, 100, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    out = full_vocab_polarity_pass(lora, ids[:, :3], mask[:, :3], ids[:, 3:], mask[:, 3:])
    with torch.no_grad():
        logits = lora(input_ids=ids, attention_mask=mask).logits[:, 2:5]
    logps = logits.log_softmax(-1).gather(-1, ids[:, 3:].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out["logps"], logps, rtol=1e-12, atol=1e-12)
    with lora.disable_adapter(), torch.no_grad():
        base = full_vocab_polarity_pass(lora, ids[:, :3], mask[:, :3], ids[:, 3:], mask[:, 3:])
    assert not torch.allclose(base["logps"], out["logps"])  # the adapter is applied


# ------------------------------------------------------------------------------------------------- 3. real runs
def train_reweighting(tokenizer, settings, resume=None):
    trainer = PolarityReweightingGRPOTrainer(
        model=build_model(tokenizer),
        reward_funcs=[length_reward],
        args=PolarityReweightingGRPOConfig(**settings),
        train_dataset=arithmetic_dataset(16),
        processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def logs_with(trainer, key):
    return {h["step"]: h for h in trainer.state.log_history if key in h}


def test_reweighting_run_applies_omega_times_a(tmp_path, tokenizer, monkeypatch):
    seen = []
    original = PolarityReweightingGRPOTrainer._generate_and_score_completions

    def spy(self, inputs):
        out = original(self, inputs)
        seen.append({k: out[k].clone() for k in ("advantages", "completion_mask")})
        return out

    monkeypatch.setattr(PolarityReweightingGRPOTrainer, "_generate_and_score_completions", spy)
    settings = training_args(tmp_path, max_steps=3, polarity_diagnostics=True, polarity_entropy_target=50.0)
    trainer = train_reweighting(tokenizer, settings)
    logs = logs_with(trainer, "polarity_reweighting/lambda")
    assert sorted(logs) == [1, 2, 3]
    for step in (1, 2, 3):
        # An entropy far below the 50-nat target: lambda = 0.5 tanh(5 (50 - H~) / 50) > 0.
        assert 0 < logs[step]["polarity_reweighting/lambda"] <= 0.5
        assert "polarity/expanding_fraction_positive" in logs[step]
    assert "polarity/realized_entropy_change" in logs[2]
    for batch in seen:
        adv, mask = batch["advantages"], batch["completion_mask"].bool()
        assert adv.dim() == 2
        # Each row's advantage takes at most 3 values c(1 - lam), c, c(1 + lam) times A, all of the same sign.
        for row, m in zip(adv, mask):
            values = row[m]
            assert (values >= 0).all() or (values <= 0).all()
    state = trainer._polarity_controller.tracks["policy"]
    assert state["batches"] == 3


def test_reweighting_with_lambda_zero_is_grpo(tmp_path, tokenizer):
    from trl import GRPOConfig, GRPOTrainer

    settings = training_args(tmp_path / "a", max_steps=2)
    grpo = GRPOTrainer(
        model=build_model(tokenizer),
        reward_funcs=[length_reward],
        args=GRPOConfig(**settings),
        train_dataset=arithmetic_dataset(16),
        processing_class=tokenizer,
    )
    grpo.train()
    ours = train_reweighting(tokenizer, {**settings, "output_dir": str(tmp_path / "b"), "polarity_lambda_max": 0.0})
    for a, b in zip(grpo.model.parameters(), ours.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _policy_split_trainer(tokenizer, settings):
    from policy_split_trl import PolicySplitGRPOConfig
    from policy_split_trl.methods import trainer_class

    args = PolicySplitGRPOConfig(**settings)
    cls = trainer_class("policy_split", args)
    return cls(
        model=build_model(tokenizer),
        reward_funcs=[length_reward],
        args=args,
        train_dataset=arithmetic_dataset(16),
        processing_class=tokenizer,
    )


def test_policy_split_mro_and_plain_trainer_refuses_the_setting(tmp_path, tokenizer):
    from policy_split_trl import PolicySplitGRPOConfig, PolicySplitGRPOTrainer
    from policy_split_trl.methods import trainer_class
    from policy_split_trl.polarity import PolarityDiagnosticsMixin

    args = PolicySplitGRPOConfig(**training_args(tmp_path), polarity_reweighting="both", polarity_diagnostics=True)
    cls = trainer_class("policy_split", args)
    mro = cls.__mro__
    assert (
        mro.index(PolarityDiagnosticsMixin) < mro.index(PolarityPolicySplitMixin) < mro.index(PolicySplitGRPOTrainer)
    )
    with pytest.raises(ValueError, match="polarity_reweighting='both' needs the trainer composed"):
        PolicySplitGRPOTrainer(model=build_model(tokenizer), reward_funcs=[length_reward], args=args)


@pytest.mark.parametrize(
    "context, optimized_step, sharing",
    [
        ("normal", True, True),
        ("both", True, True),
        ("both", False, True),
        ("high_entropy", True, True),
        ("both", True, False),
    ],
    ids=["normal-deferred-bonus", "both-deferred-bonus", "both-reference-step", "high_entropy", "both-no-sharing"],
)
def test_policy_split_composition_runs(tmp_path, tokenizer, context, optimized_step, sharing, monkeypatch):
    from policy_split_trl.trainer import PolicySplitGRPOTrainer

    checks = []
    original = PolicySplitGRPOTrainer._weight_base_term

    def spy(self, inputs, advantages):
        out = PolarityPolicySplitMixin._weight_base_term(self, inputs, advantages)
        checks.append((inputs, advantages.clone(), out.clone()))
        return out

    settings = training_args(
        tmp_path,
        max_steps=2,
        polarity_reweighting=context,
        optimized_step=optimized_step,
        polarity_diagnostics=True,
        rollout_sharing=sharing,
    )
    trainer = _policy_split_trainer(tokenizer, settings)
    monkeypatch.setattr(type(trainer), "_weight_base_term", spy)
    assert original is not None
    trainer.train()
    names = {"normal": ["normal_context"], "high_entropy": ["high_entropy_context"]}.get(
        context, ["normal_context", "high_entropy_context"]
    )
    assert set(trainer._polarity_controller.tracks) == set(names)
    logs = logs_with(trainer, "polarity/normal_context/entropy")
    assert sorted(logs) == [1, 2]
    for name in names:
        assert f"polarity_reweighting/{name}/lambda" in logs[1]
    assert any(key in inputs for inputs, _, _ in checks for key in POLARITY_SHIFT_KEYS.values())  # exercised
    for inputs, before, after in checks:
        ctx = inputs["policy_split_context"]
        for index, key in POLARITY_SHIFT_KEYS.items():
            rows = ctx == index
            expected = before[rows] + (inputs[key][rows] if key in inputs else 0)
            torch.testing.assert_close(after[rows], expected)
        mask = inputs["completion_mask"].bool()
        # The shift never flips the sign of the advantage (omega > 0, the bonus's clip relative to the unweighted |A|).
        assert ((torch.sign(after) == torch.sign(before)) | (before == 0) | ~mask).all()


def test_policy_split_shift_is_omega_minus_one_times_a(tmp_path, tokenizer, monkeypatch):
    """The HE context's final advantage is c omega A + clip(eta B, |A|/kappa): the bonus's clip uses the unweighted A."""
    from policy_split_trl.advantages import entropy_regularized_advantages

    captured = {}
    trainer = _policy_split_trainer(
        tokenizer, training_args(tmp_path, max_steps=1, polarity_reweighting="high_entropy", optimized_step=False)
    )
    cls = type(trainer)
    original_add = cls._add_contexts
    original_dual = cls._dual_mode_advantages

    def add(self, output, *args):
        captured["base"] = output["advantages"].clone()
        out = original_add(self, output, *args)
        captured["out"] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
        return out

    def dual(self, advantages, logps_he, logps_normal, mask, is_he):
        captured["dual"] = (advantages, logps_he, logps_normal, mask)
        return original_dual(self, advantages, logps_he, logps_normal, mask, is_he)

    monkeypatch.setattr(cls, "_add_contexts", add)
    monkeypatch.setattr(cls, "_dual_mode_advantages", dual)
    trainer.train()
    out, base = captured["out"], captured["base"]
    shift = out[POLARITY_SHIFT_KEYS[1]]
    assert POLARITY_SHIFT_KEYS[0] not in out
    mask = out["completion_mask"].bool()
    factor = torch.where(base.unsqueeze(1) != 0, shift / base.unsqueeze(1) + 1.0, torch.ones_like(shift))
    lam = trainer._polarity_controller.tracks["high_entropy_context"]["lam"]
    values = factor[mask & (base.unsqueeze(1) != 0)]
    # c omega takes at most 3 values: c (1 - lam), c, c (1 + lam); pressure sum |A| c omega = sum |A|.
    distinct = torch.unique(values.round(decimals=5))
    assert len(distinct) <= 3 and (values > 0).all()
    magnitude = base.abs().unsqueeze(1) * mask
    assert float((magnitude * factor).sum()) == pytest.approx(float(magnitude.sum()), rel=1e-5)
    assert lam != 0
    # The HE advantages stored are Policy Split's own (A + clipped bonus); the shift is added in the loss pass.
    advantages, logps_he, logps_normal, m = captured["dual"]
    from policy_split_trl.advantages import dual_mode_bonus, normalize_bonus

    normalized = normalize_bonus(dual_mode_bonus(logps_he, logps_normal, 0.5), m, 4)
    expected_he = entropy_regularized_advantages(advantages, normalized, 0.03, 2.0, "inside_clip")
    torch.testing.assert_close(out["policy_split_he_advantages"], expected_he)


# ------------------------------------------------------------------------------------------------- 4. resume
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("polarity-resume") / "out"
    settings = training_args(out, max_steps=4, save_strategy="steps", save_steps=2, polarity_entropy_target=50.0)
    trainer = train_reweighting(tokenizer, settings)
    return out, settings, logs_with(trainer, "polarity_reweighting/lambda"), trainer._polarity_controller.state()


def test_resume_continues_the_controller_exactly(tmp_path, tokenizer, uninterrupted):
    out, settings, logs, final_state = uninterrupted
    with open(out / "checkpoint-2" / "trainer_state.json") as f:
        saved = json.load(f)["stateful_callbacks"]["PolarityController"]["attributes"]["tracks"]["policy"]
    assert saved["batches"] == 2 and saved["lam"] == logs[2]["polarity_reweighting/lambda"]
    resumed = train_reweighting(
        tokenizer, {**settings, "output_dir": str(tmp_path / "resumed")}, resume=str(out / "checkpoint-2")
    )
    resumed_logs = logs_with(resumed, "polarity_reweighting/lambda")
    for step in (3, 4):
        assert resumed_logs[step]["polarity_reweighting/lambda"] == logs[step]["polarity_reweighting/lambda"]
        assert (
            resumed_logs[step]["polarity_reweighting/smoothed_entropy"]
            == logs[step]["polarity_reweighting/smoothed_entropy"]
        )
    assert resumed._polarity_controller.state() == final_state


# ------------------------------------------------------------------------------------------------- 5. 2 processes


@requires_launcher("accelerate")
def test_two_processes_hold_the_same_controller_as_one(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    results = {}
    for processes in (2, 1):
        path = tmp_path / f"result-{processes}.json"
        cmd = [launcher("accelerate"), "launch"]
        cmd += ["--multi_gpu", "--num_processes", "2"] if processes == 2 else ["--num_processes", "1"]
        cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        cmd += ["--main_process_port", str(free_port()), os.path.join(HERE, "polarity_run.py")]
        cmd += [str(path), str(tmp_path / f"out{processes}")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, check=False)
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.splitlines() if "Warning" not in line]
            raise AssertionError("\n".join(lines[-60:]))
        results[processes] = json.loads(path.read_text())
    (single,), (rank0, rank1) = results[1], results[2]
    # Fixed batches: 2 all-reduces per batch on every process, even the batch where one process has no token.
    assert rank0["fixed"]["reduces"] == rank1["fixed"]["reduces"] == single["fixed"]["reduces"] == 6
    assert rank0["fixed"]["state"] == rank1["fixed"]["state"]  # bit-identical on both processes
    tracks2 = rank0["fixed"]["state"]["attributes"]["tracks"]["policy"]
    tracks1 = single["fixed"]["state"]["attributes"]["tracks"]["policy"]
    assert tracks2["batches"] == tracks1["batches"] == 3
    for key in ("anchor", "smoothed", "lam", "phase"):  # the same as one process on the same rows
        assert tracks2[key] == pytest.approx(tracks1[key], rel=1e-6), key
    for two, one in zip(rank0["fixed"]["factors"], single["fixed"]["factors"], strict=True):
        torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-6, atol=1e-7)
    # A real Policy Split run, both contexts reweighted, with diagnostics: the same controller and collectives.
    ps0, ps1 = rank0["policy_split"], rank1["policy_split"]
    assert ps0["global_step"] == 3 and ps0["state"] == ps1["state"]
    assert set(ps0["state"]["attributes"]["tracks"]) == {"normal_context", "high_entropy_context"}
    assert all(t["batches"] == 3 for t in ps0["state"]["attributes"]["tracks"].values())
    assert ps0["reduces"] == ps1["reduces"] == 3 * (2 + 1)


def test_polarity_series_and_plot_from_log_histories(tmp_path):
    from policy_split_trl.comparison.table import read_log_history
    from policy_split_trl.polarity import plot_polarity, polarity_series

    grpo = [
        {"step": 1, "polarity/expanding_fraction_positive": 0.25, "loss": 0.1},
        {"step": 2, "polarity/expanding_fraction_positive": 0.5, "polarity/expanding_fraction_negative": 0.75},
        {"train_runtime": 3.0, "polarity/ignored_without_a_step": 1.0},
    ]
    policy_split = [
        {"step": 1, "polarity/normal_context/expanding_fraction_positive": 0.1},
        {"step": 1, "polarity/high_entropy_context/expanding_fraction_positive": 0.2},
    ]
    assert polarity_series(grpo) == {
        "": {"expanding_fraction_positive": ([1, 2], [0.25, 0.5]), "expanding_fraction_negative": ([2], [0.75])}
    }
    assert polarity_series(policy_split) == {
        "normal_context": {"expanding_fraction_positive": ([1], [0.1])},
        "high_entropy_context": {"expanding_fraction_positive": ([1], [0.2])},
    }
    assert polarity_series([{"step": 1, "loss": 0.0}]) == {}
    path = plot_polarity({"GRPO": grpo, "Policy Split": policy_split}, str(tmp_path / "polarity.png"))
    assert path is not None and os.path.getsize(path) > 0
    assert plot_polarity({"GRPO": [{"step": 1, "loss": 0.0}]}, str(tmp_path / "none.png")) is None  # no diagnostics

    # What the comparison reads next to each trained model: missing -> None, damaged -> a warning and None.
    assert read_log_history(str(tmp_path / "missing")) is None
    (tmp_path / "log_history.json").write_text(json.dumps({"log_history": grpo}))
    assert read_log_history(str(tmp_path)) == grpo
    (tmp_path / "log_history.json").write_text('{"log_history": [')
    with pytest.warns(UserWarning, match="log_history.json"):
        assert read_log_history(str(tmp_path)) is None


def test_polarity_diagnostics_is_a_setting_of_every_method():
    from policy_split_trl.methods import METHODS, inapplicable_settings

    for method in METHODS:
        assert inapplicable_settings(method, ["polarity_diagnostics", "polarity_chunk_tokens"]) == []
    assert inapplicable_settings("grpo", ["polarity_lambda_max"]) == ["polarity_lambda_max"]  # reweighting only


def test_polarity_cost_benchmark_prints_the_ratio(tiny_model_path, tmp_path, capsys):
    from policy_split_trl.benchmarks.polarity_cost import run

    out = tmp_path / "cost.json"
    result = run(
        ["--model", tiny_model_path, "--rows", "2", "--prompt_tokens", "3", "--completion_tokens", "5"]
        + ["--repeats", "2", "--num_threads", "1", "--output", str(out)]
    )
    assert len(result["seconds"]["polarity_pass"]) == 2 and len(result["seconds"]["train_forward_backward"]) == 2
    medians = result["median_seconds"]
    assert result["ratio"] == pytest.approx(medians["polarity_pass"] / medians["train_forward_backward"])
    assert json.loads(out.read_text())["ratio"] == result["ratio"]
    assert f"ratio {result['ratio']:.2f}" in capsys.readouterr().out
