"""Dual-mode evaluation: metric functions against hand computations, and the harness end to end on a tiny model."""

import json
import math
import os
import re

import pytest
import torch
from fake_vllm import install_fake_vllm, save_tiny_lora_adapter

from policy_split_trl.advantages import forward_kl_estimate
from policy_split_trl.eval.metrics import avg_at_k, pass_at_k, token_entropy_bits, token_logprobs, unique_solved
from policy_split_trl.scripts.evaluate import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATH500 = os.path.join(ROOT, "tests", "data", "math500.jsonl")


def test_entropy_in_bits_hand_computed():
    # uniform over 4 tokens: log2(4) = 2 bits; (1/2, 1/4, 1/4): 0.5*1 + 0.25*2 + 0.25*2 = 1.5 bits
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.5, 0.25, 0.25, 1e-30]])
    torch.testing.assert_close(token_entropy_bits(probs.log()), torch.tensor([2.0, 1.5]), atol=1e-5, rtol=0)
    # temperature 2 on logits log(0.5, 0.25, 0.25): softmax of log p / 2 ~ sqrt(p) normalised
    q = torch.tensor([0.5, 0.25, 0.25]).sqrt()
    q = q / q.sum()
    expected = -(q * q.log2()).sum()
    torch.testing.assert_close(token_entropy_bits(torch.tensor([0.5, 0.25, 0.25]).log(), 2.0), expected)
    with pytest.raises(ValueError, match="temperature"):
        token_entropy_bits(probs, 0.0)


def test_kl_estimator_equals_exact_kl_on_a_toy_case():
    # Samples whose empirical distribution is exactly p = (1/2, 1/4, 1/4): the Monte-Carlo mean is the exact KL.
    p, q = torch.tensor([0.5, 0.25, 0.25]), torch.tensor([0.25, 0.25, 0.5])
    exact = (p * (p / q).log()).sum()  # = 0.5 ln 2 - 0.25 ln 2 = 0.25 ln 2
    samples = torch.tensor([[0, 0, 1, 2]])
    logits_p, logits_q = p.log().expand(1, 4, 3), q.log().expand(1, 4, 3)
    total, count = forward_kl_estimate(
        token_logprobs(logits_p, samples), token_logprobs(logits_q, samples), torch.ones(1, 4)
    )
    assert (total / count).item() == pytest.approx(exact.item(), abs=1e-6)
    assert exact.item() == pytest.approx(0.25 * math.log(2))


def test_avg_and_pass_at_k_on_fixed_matrices():
    correct = [[True, False, False, False], [False, False, False, False], [True, True, True, True]]
    assert avg_at_k(correct) == pytest.approx((0.25 + 0.0 + 1.0) / 3)
    assert pass_at_k(correct) == pytest.approx(2 / 3)
    assert math.isnan(avg_at_k([])) and math.isnan(pass_at_k([]))
    solved = {
        "normal": {"p1": [True, False], "p2": [False, False], "p3": [True, True]},
        "high_entropy": {"p1": [False, False], "p2": [False, True], "p3": [True, False]},
    }
    assert unique_solved(solved) == {"normal": 1, "high_entropy": 1}  # p1 only normal, p2 only HE


def eval_args(tiny_model_path, out, *extra):
    return [
        "--model",
        tiny_model_path,
        "--benchmarks",
        "math500",
        "creative_writing",
        "--source",
        f"math500={MATH500}",
        "--limit",
        "5",
        "--limit_for",
        "creative_writing=2",
        "--k",
        "2",
        "--max_new_tokens",
        "8",
        "--temperature",
        "1.0",
        "--top_p",
        "1.0",
        "--top_k",
        "0",
        "--batch_size",
        "4",
        "--backend",
        "transformers",
        "--output_dir",
        str(out),
        *extra,
    ]


def test_cli_end_to_end_and_resume(tiny_model_path, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    from policy_split_trl.eval import backends

    calls = {"n": 0}
    real_generate = backends.TransformersBackend.generate

    def crashing_generate(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed halfway")
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(backends.TransformersBackend, "generate", crashing_generate)
    with pytest.raises(KeyboardInterrupt):
        run(eval_args(tiny_model_path, out))
    lines_before = (out / "generations.jsonl").read_text().splitlines()
    assert 0 < len(lines_before) < (5 + 2) * 2 * 2  # some, not all, of 7 problems x 2 modes x k=2

    monkeypatch.setattr(backends.TransformersBackend, "generate", real_generate)
    results = run(eval_args(tiny_model_path, out))
    assert 0 < results["generated_this_run"] < (5 + 2) * 2 * 2  # resumed: fewer generations than a full run
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(records) == (5 + 2) * 2 * 2
    assert records[: len(lines_before)] == [json.loads(line) for line in lines_before]  # nothing redone

    again = run(eval_args(tiny_model_path, out))
    assert again["generated_this_run"] == 0  # everything done: nothing regenerated

    for name in ("results.json", "results.md", "entropy_histogram.png", "accuracy_vs_entropy.png"):
        assert (out / name).exists(), name
    saved = json.loads((out / "results.json").read_text())
    math500 = saved["per_benchmark"]["math500"]
    for mode in ("normal", "high_entropy"):
        m = math500[mode]
        assert m["problems"] == 5 and m["samples"] == 10
        assert 0.0 <= m["avg_at_k"] <= m["pass_at_k"] <= 1.0
        assert 0.0 < m["entropy_bits"] <= math.log2(len_vocab(tiny_model_path)) + 1e-6
        assert 1 <= m["mean_length"] <= 8
    comparison = saved["comparisons"]["math500"]["high_entropy"]
    assert math.isfinite(comparison["kl_mode_normal"]) and comparison["abs_delta_length"] >= 0
    creative = saved["creative"]
    assert set(creative) == {"normal", "high_entropy"} and creative["normal"]["prompts"] == 2
    assert 0.0 <= creative["normal"]["div_ngram"] <= 1.0 and 0.0 <= creative["normal"]["div_bleu"] <= 1.0
    assert saved["entropy"]["unit"] == "bits" and saved["entropy"]["temperature"] == 1.0
    assert saved["config"]["backend_used"] == "transformers" and "torch" in saved["versions"]
    assert "MATH-500 Acc" in (out / "results.md").read_text()
    assert "Dual-mode comparison" in (out / "results.md").read_text()


def len_vocab(path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).vocab_size


def test_entropy_raw_option_is_recorded(tiny_model_path, tmp_path):
    results = run(
        [
            *eval_args(tiny_model_path, tmp_path / "raw", "--entropy_temperature", "raw", "--no_kl"),
            "--temperature",
            "0.7",
            "--benchmarks",
            "math500",
            "--limit",
            "2",
        ]
    )
    assert results["entropy"]["temperature"] == 1.0 and results["entropy"]["distribution"].startswith("raw")
    assert "kl_mode_normal" not in results["per_benchmark"]["math500"]["high_entropy"]


def test_dual_mode_eval_callback_logs_during_training(tiny_model_path, tmp_path):
    from policy_split_trl.scripts.train import run as train

    trainer = train(
        [
            "--config",
            os.path.join(ROOT, "recipes", "quickstart.yaml"),
            "--model_name_or_path",
            tiny_model_path,
            "--output_dir",
            str(tmp_path / "out"),
            "--max_steps",
            "4",
            "--max_completion_length",
            "8",
            "--num_generations",
            "4",
            "--per_device_train_batch_size",
            "4",
            "--per_device_eval_batch_size",
            "8",
            "--max_eval_samples",
            "3",
            "--mode_report",
            "false",
            "--use_cpu",
            "true",
            "--report_to",
            "none",
            "--dual_mode_eval_steps",
            "2",
            "--dual_mode_eval_k",
            "2",
        ]
    )
    logged = [h for h in trainer.state.log_history if "dual_mode_eval/normal/accuracy" in h]
    assert [h["step"] for h in logged] == [2, 4]
    for h in logged:
        for mode in ("normal", "high_entropy"):
            assert 0.0 <= h[f"dual_mode_eval/{mode}/accuracy"] <= h[f"dual_mode_eval/{mode}/pass_at_k"] <= 1.0
            assert h[f"dual_mode_eval/{mode}/entropy_bits"] > 0 and 1 <= h[f"dual_mode_eval/{mode}/length"] <= 8
        assert math.isfinite(h["dual_mode_eval/kl_high_entropy_normal"])
    assert trainer.model.training  # the callback gave the model back in training mode


def test_cli_creative_writing_with_judge_never_writes_the_key(tiny_model_path, tmp_path, monkeypatch):
    from test_judge import API_KEY, MODEL, FakeOpenAIServer, paper_reply

    server = FakeOpenAIServer()
    try:
        monkeypatch.setenv("POLICY_SPLIT_JUDGE_API_KEY", API_KEY)
        # 2 prompts x k=2 x 2 modes = 8 stories; the first reply is malformed, the rest score 7/6/8/5/9
        server.reply("I liked it a lot!")
        for _ in range(7):
            server.reply(paper_reply(7, 6, 8, 5, 9))
        out = tmp_path / "judged"
        results = run(
            [
                *eval_args(tiny_model_path, out),
                "--benchmarks",
                "creative_writing",
                "--judge_base_url",
                server.base_url,
                "--judge_model",
                MODEL,
            ]
        )
    finally:
        server.close()
    judged = results["judge"]
    assert sum(j["n_unparseable"] for j in judged.values()) == 1  # counted, not scored 0
    assert sum(j["n_scored"] for j in judged.values()) == 7
    scored_normal = judged["normal"] if judged["normal"]["n_scored"] == 4 else judged["high_entropy"]
    assert scored_normal["overall"] == pytest.approx(70.0)  # mean of 7, 6, 8, 5, 9 scaled to 100
    assert all(r["headers"].get("Authorization") == f"Bearer {API_KEY}" for r in server.requests)
    for path in out.iterdir():
        assert API_KEY.encode() not in path.read_bytes(), path.name
    assert "judge (0-100)" in (out / "results.md").read_text()


def judged_cli(tiny_model_path, out, server, monkeypatch):
    """`policy-split-eval` (the console entry point) on 2 story prompts x k=2 x 2 modes = 8 stories, judged."""
    from test_judge import MODEL

    from policy_split_trl.scripts.evaluate import cli

    argv = [
        *eval_args(tiny_model_path, out),
        "--benchmarks",
        "creative_writing",
        "--judge_base_url",
        server.base_url,
        "--judge_model",
        MODEL,
    ]
    monkeypatch.setattr("sys.argv", ["policy-split-eval", *argv])
    cli()


@pytest.mark.parametrize(
    "replies, persistent, requests, failed, message",
    [
        ([], ({"error": "bad key"}, 401), 1, 1, r"scored none of the 8 stories .*: HTTP 401 \(the API key is missing"),
        (
            [],
            ({"error": "overloaded"}, 500),
            3 * 3,
            3,  # 3 stories x (1 call + 2 retries), then no more
            r"scored none of the 8 stories .*: 3 stories in a row failed the same way \(HTTP 500\)",
        ),
        ([], ("Nice story!", 200), 3, 3, r"scored none of the 8 stories .*3 stories in a row .*\(unparseable reply\)"),
        (
            [None, None],
            ({"error": "revoked"}, 403),
            3,
            1,
            r"the judge was stopped after scoring 2 of 8 stories: HTTP 403",
        ),
    ],
    ids=["auth", "server_error", "unparseable", "stopped_midway"],
)
def test_a_failing_judge_stops_early_and_the_cli_exits_non_zero(
    tiny_model_path, tmp_path, monkeypatch, replies, persistent, requests, failed, message
):
    from test_judge import FakeOpenAIServer, paper_reply

    monkeypatch.setattr("time.sleep", lambda seconds: None)  # the judge client's backoff between retries
    server = FakeOpenAIServer()
    try:
        for _ in replies:
            server.reply(paper_reply(7, 6, 8, 5, 9))
        server.always(*persistent)
        out = tmp_path / "judged"
        with pytest.raises(SystemExit) as exit_:
            judged_cli(tiny_model_path, out, server, monkeypatch)
        assert len(server.requests) == requests  # not 8 stories x (1 + retries)
        assert isinstance(exit_.value.code, str) and exit_.value.code.startswith("policy-split-eval: the judge")
        assert re.search(message, exit_.value.code) and "rerun the same command" in exit_.value.code
        saved = json.loads((out / "results.json").read_text())  # everything else was written first
        status = saved["judge_status"]
        assert re.search(message, status["error"]) and status["stories"] == 8 and status["scored"] == len(replies)
        assert sum(j["n_skipped"] for j in saved["judge"].values()) == 8 - len(replies) - failed  # not sent
        assert "Judge: the judge" in (out / "results.md").read_text()
        assert len((out / "generations.jsonl").read_text().splitlines()) == 8

        # Once the judge works, the same command judges again without sampling again, and exits 0.
        server.always(paper_reply(5, 5, 5, 5, 5))
        judged_cli(tiny_model_path, out, server, monkeypatch)
        saved = json.loads((out / "results.json").read_text())
        assert saved["judge_status"] == {"stories": 8, "scored": 8, "stopped": None, "error": None}
        assert saved["generated_this_run"] == 0
    finally:
        server.close()


def test_vllm_backend_maps_sampling_and_scores_with_transformers(tiny_model_path, monkeypatch):
    """No GPU here: the fake `vllm` (tests/fake_vllm.py) takes only what the real one takes, and records the calls."""
    from policy_split_trl.eval import backends

    vllm = install_fake_vllm(monkeypatch)
    monkeypatch.setattr(backends, "vllm_available", lambda: True)

    backend = backends.make_backend(tiny_model_path, backend="auto", gpu_memory_utilization=0.4)
    llm = vllm.built[-1]
    assert backend.name == "vllm" and llm.kwargs["gpu_memory_utilization"] == 0.4
    assert llm.kwargs["enable_lora"] is False and "max_lora_rank" not in llm.kwargs
    prompts = [[{"role": "user", "content": "1 + 1 ="}], [{"role": "user", "content": "2 + 2 ="}]]
    out = backend.generate(prompts, 3, backends.SamplingConfig(0.6, 0.95, 0, 16), seed=7)
    call = llm.calls[-1]
    params = call.sampling_params
    assert (params.n, params.temperature, params.top_p, params.top_k, params.max_tokens, params.seed) == (
        3,
        0.6,
        0.95,
        -1,
        16,
        7,
    )
    # vLLM gets the same chat-template token ids the transformers backend would use
    assert call.prompts[0]["prompt_token_ids"] == backend.scorer.prompt_ids(prompts[0])
    assert call.lora_request is None and call.kwargs["use_tqdm"] is False
    assert out == [[[5, 6, 2]] * 3] * 2
    scored = backend.score(prompts[:1], [[5, 6, 2]], 1.0)
    assert len(scored[0].logprobs) == 3  # scored by the transformers model
    assert backends.make_backend(tiny_model_path, backend="transformers").name == "transformers"


@pytest.fixture
def rank32_adapter(tiny_model_path, tmp_path):
    """A real PEFT LoRA adapter with r=32 (our recipes' rank, above vLLM's default `max_lora_rank` of 16)."""
    return save_tiny_lora_adapter(tiny_model_path, str(tmp_path / "lora-r32"), r=32)


def test_vllm_backend_serves_a_rank_32_adapter(tiny_model_path, rank32_adapter, monkeypatch):
    from policy_split_trl.eval import backends

    vllm = install_fake_vllm(monkeypatch)
    monkeypatch.setattr(backends, "vllm_available", lambda: True)
    backend = backends.make_backend(tiny_model_path, adapter=rank32_adapter, backend="vllm")
    prompts = [[{"role": "user", "content": "1 + 1 ="}]]
    # vLLM loads the adapter with the first request: with its default max_lora_rank (16) this raised
    assert backend.generate(prompts, 2, backends.SamplingConfig(0.6, 0.95, 20, 8)) == [[[5, 6, 2]] * 2]
    llm = vllm.built[-1]
    assert (llm.kwargs["enable_lora"], llm.kwargs["max_lora_rank"]) == (True, 32)
    assert llm.calls[-1].lora_request.lora_path == rank32_adapter
    assert len(backend.score(prompts, [[5, 6, 2]])[0].logprobs) == 3  # the scorer carries the same adapter


def test_eval_cli_passes_the_adapter_to_vllm(tiny_model_path, rank32_adapter, tmp_path, monkeypatch):
    from policy_split_trl.eval import backends

    vllm = install_fake_vllm(monkeypatch)
    monkeypatch.setattr(backends, "vllm_available", lambda: True)
    args = eval_args(tiny_model_path, tmp_path / "vllm", "--adapter", rank32_adapter, "--backend", "vllm")
    results = run([*args, "--benchmarks", "math500", "--limit", "1", "--k", "1", "--no_kl"])
    assert results["config"]["backend_used"] == "vllm" and results["config"]["adapter"] == rank32_adapter
    llm = vllm.built[-1]
    assert llm.kwargs["max_lora_rank"] == 32
    assert {call.lora_request.lora_path for call in llm.calls} == {rank32_adapter}


def test_vllm_lora_kwargs_rounds_the_rank_up_to_what_vllm_accepts(tmp_path):
    from policy_split_trl.eval.backends import VLLM_LORA_RANKS, lora_rank, vllm_lora_kwargs

    def adapter(name, config):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
        return str(folder)

    assert vllm_lora_kwargs(None) == {"enable_lora": False}
    assert vllm_lora_kwargs(adapter("r32", {"r": 32})) == {"enable_lora": True, "max_lora_rank": 32}
    assert vllm_lora_kwargs(adapter("r4", {"r": 4}))["max_lora_rank"] == 8  # 4 is not a value vLLM accepts
    assert vllm_lora_kwargs(adapter("r300", {"r": 300}))["max_lora_rank"] == 320
    # a module lifted above `r` by rank_pattern sets the rank
    lifted = adapter("pattern", {"r": 16, "rank_pattern": {"q_proj": 48, "v_proj": 8}})
    assert lora_rank(lifted) == 48 and vllm_lora_kwargs(lifted)["max_lora_rank"] == 64
    assert all(vllm_lora_kwargs(adapter(f"exact{r}", {"r": r}))["max_lora_rank"] == r for r in VLLM_LORA_RANKS)
    with pytest.raises(ValueError, match="above the largest `max_lora_rank` vLLM accepts"):
        vllm_lora_kwargs(adapter("r1024", {"r": 1024}))
    with pytest.raises(ValueError, match="peft_type='PREFIX_TUNING'"):
        lora_rank(adapter("prefix", {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 8}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty has no adapter_config\.json"):
        vllm_lora_kwargs(str(tmp_path / "empty"))
    for missing in (str(tmp_path / "no-such-folder"), "no-such-org/no-such-adapter"):  # a typo, an unreachable Hub id
        with pytest.raises(FileNotFoundError, match="neither a local folder nor a reachable Hub repository"):
            lora_rank(missing)


def tiny_llama(tokenizer):
    """The embedded SmolLM2 is a Llama: the same architecture, tiny."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def full_forward_scores(model, tokenizer, messages, completion, temperature):
    """The reference: one unpadded forward over prompt + completion, log-softmax of its full logits."""
    from policy_split_trl.eval.backends import chat_prompt_ids

    ids = torch.tensor([chat_prompt_ids(tokenizer, messages) + completion])
    logits = model(input_ids=ids).logits[0, -len(completion) - 1 : -1] / temperature
    logps = torch.log_softmax(logits, dim=-1)
    chosen = logps.gather(-1, torch.tensor(completion)[:, None])[:, 0]
    entropy_bits = -(logps.exp() * logps).sum(-1) / math.log(2)
    return chosen.tolist(), entropy_bits.tolist()


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_lora", "llama"])
@torch.no_grad()
def test_scoring_keeps_only_the_last_hidden_state_and_matches_a_full_forward(tokenizer, arch):
    from tiny_model import build_model

    from policy_split_trl.eval.backends import TransformersBackend

    model = tiny_llama(tokenizer) if arch == "llama" else build_model(tokenizer)
    if arch == "qwen3_lora":
        from peft import LoraConfig, get_peft_model

        # non-zero B: the adapter really changes the scores
        model = get_peft_model(model, LoraConfig(r=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    backend = TransformersBackend(model, tokenizer, batch_size=4, score_chunk=2)
    prompts = [
        [{"role": "user", "content": "1 + 1 ="}],
        [
            {"role": "system", "content": "Think step by step."},
            {"role": "user", "content": "what is the sum of 12 and 7"},
        ],
        [{"role": "user", "content": "2 + 2 ="}],
        [{"role": "user", "content": "the answer"}],
    ]
    generator = torch.Generator().manual_seed(0)
    completions = [torch.randint(3, len(tokenizer), (n,), generator=generator).tolist() for n in (5, 3, 0, 7)]

    def refuse_all_hidden_states(module, args, kwargs):
        if kwargs.get("output_hidden_states") or getattr(getattr(module, "config", None), "output_hidden_states", 0):
            raise AssertionError(f"{type(module).__name__} was asked for every layer's hidden states")

    hooks = [m.register_forward_pre_hook(refuse_all_hidden_states, with_kwargs=True) for m in model.modules()]
    try:
        scored = backend.score(prompts, completions, temperature=0.7)
    finally:
        for hook in hooks:
            hook.remove()
    assert [len(s.logprobs) for s in scored] == [5, 3, 0, 7]
    for messages, completion, result in zip(prompts, completions, scored, strict=True):
        if completion:
            logps, ents = full_forward_scores(model, tokenizer, messages, completion, 0.7)
            torch.testing.assert_close(torch.tensor(result.logprobs), torch.tensor(logps), atol=1e-6, rtol=0)
            # entropies are ~10 bits, summed over the vocabulary in float32: 1e-6 relative is that sum's precision
            torch.testing.assert_close(torch.tensor(result.entropy_bits), torch.tensor(ents), atol=1e-6, rtol=1e-6)
    if arch == "qwen3_lora":
        with model.disable_adapter():
            base, _ = full_forward_scores(model, tokenizer, prompts[0], completions[0], 0.7)
        assert max(abs(a - b) for a, b in zip(base, scored[0].logprobs, strict=True)) > 1e-3  # LoRA was applied
