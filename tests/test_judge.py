"""LLM-as-a-judge: prompt, reply parsing, the OpenAI-compatible client (against a local fake server) and aggregation."""

from __future__ import annotations

import json
import logging
import pickle
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from policy_split_trl.eval.creative import CREATIVE_WRITING_PROMPTS
from policy_split_trl.eval.judge import (
    JUDGE_MAX_CONSECUTIVE_FAILURES,
    JUDGE_PROMPT,
    RUBRICS,
    JudgeCircuitBreaker,
    JudgeResult,
    OpenAIJudge,
    TransformersJudge,
    build_judge_prompt,
    judge_stories,
    parse_judge_scores,
)

API_KEY = "sk-test-DO-NOT-LEAK-0123456789abcdef"
MODEL = "judge-model-x"


def paper_reply(creativity: float, originality: float, narrative: float, emotional: float, imagery: float) -> str:
    """A reply in the exact format the judge prompt asks for."""
    return (
        f"* **Creativity:** {creativity}\n"
        f"* **Originality:** {originality}\n"
        f"* **Narrative Flow:** {narrative}\n"
        f"* **Emotional Impact:** {emotional}\n"
        f"* **Imagery:** {imagery}"
    )


# ---------------------------------------------------------------------------------------------- fake OpenAI server


class FakeOpenAIServer:
    """`POST /v1/chat/completions` answering canned replies in order (`default`, a good reply unless set with
    `always`, when none is queued)."""

    def __init__(self) -> None:
        self.queue: list[tuple[int, Any, dict[str, str]]] = []
        self.default: tuple[int, Any, dict[str, str]] = (200, paper_reply(5, 5, 5, 5, 5), {})
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def _record(self, body: Any) -> None:
                with server.lock:
                    server.requests.append(
                        {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
                    )

            def do_GET(self) -> None:  # only reached if a redirect were followed
                self._record(None)
                self.send_response(404)
                self.end_headers()

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self._record(body)
                with server.lock:
                    status, payload, headers = server.queue.pop(0) if server.queue else server.default
                if payload == "ECHO_AUTH":  # a server that (badly) echoes credentials in its error body
                    payload = {"error": f"invalid key {self.headers.get('Authorization')}"}
                if status == 200 and isinstance(payload, str):
                    payload = {
                        "id": "chatcmpl-1",
                        "object": "chat.completion",
                        "model": body.get("model"),
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": payload}}],
                    }
                if isinstance(payload, bytes):  # sent as is
                    data = payload
                else:
                    data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def reply(self, content: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.queue.append((status, content, headers or {}))

    def always(self, content: Any, status: int = 200) -> None:
        """Answer every request that finds the queue empty with this (a persistent failure)."""
        self.default = (status, content, {})

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    fake = FakeOpenAIServer()
    yield fake
    fake.close()


@pytest.fixture
def no_judge_env(monkeypatch):
    for name in (
        "POLICY_SPLIT_JUDGE_BASE_URL",
        "POLICY_SPLIT_JUDGE_MODEL",
        "POLICY_SPLIT_JUDGE_API_KEY",
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
    ):
        monkeypatch.delenv(name, raising=False)


def make_judge(server: FakeOpenAIServer, **kwargs: Any) -> OpenAIJudge:
    kwargs = {"base_url": server.base_url, "model": MODEL, "api_key": API_KEY, "retry_backoff": 0.0, **kwargs}
    return OpenAIJudge(**kwargs)


# ---------------------------------------------------------------------------------------------------------- prompt


def test_judge_prompt():
    for name in ("Creativity", "Originality", "Narrative Flow", "Emotional Impact", "Imagery"):
        assert f"* **{name}:** [Score]" in JUDGE_PROMPT
    assert "on a scale of **0 to 10**" in JUDGE_PROMPT
    assert JUDGE_PROMPT.startswith("You are an expert literary critic and creative writing judge")
    assert JUDGE_PROMPT.endswith(
        "Directly output the scores in the above format, without any additional explanations."
    )
    filled = build_judge_prompt(CREATIVE_WRITING_PROMPTS[0], "Once upon a {time}.")
    assert (
        f"**Original Prompt:**\n{CREATIVE_WRITING_PROMPTS[0]}\n\n**Story to Evaluate:**\nOnce upon a {{time}}."
        in filled
    )
    assert "{prompt}" not in filled and "{story}" not in filled
    # The prompt's own output format parses (with scores in place of "[Score]").
    template = JUDGE_PROMPT[JUDGE_PROMPT.index("* **Creativity:**") : JUDGE_PROMPT.index("\n\nDirectly")]
    assert parse_judge_scores(template.replace("[Score]", "7")) == dict.fromkeys(RUBRICS, 7.0)
    assert parse_judge_scores(template) is None  # the unfilled template


# ---------------------------------------------------------------------------------------------------------- parser

EXPECTED = {"creativity": 8.0, "originality": 7.0, "narrative_flow": 9.0, "emotional_impact": 6.5, "imagery": 10.0}


@pytest.mark.parametrize(
    "text",
    [
        paper_reply(8, 7, 9, 6.5, 10),
        "Creativity: 8\nOriginality: 7\nNarrative Flow: 9\nEmotional Impact: 6.5\nImagery: 10",
        # markdown bold around the names and/or the scores, "/10", "[8]", "out of 10", numbering, descriptions
        (
            "**Creativity**: 8/10\n**Originality**: [7]\n**Narrative Flow:** **9**\n"
            "- Emotional Impact: 6.5 out of 10\n- **Imagery:** 10 / 10"
        ),
        (
            "1. **Creativity (Novelty and uniqueness of ideas):** 8\n2. **Originality (Innovative approach):** 7\n"
            "3. Narrative Flow (Coherence): 9\n4. Emotional Impact: 6.5\n5. Imagery: 10."
        ),
        # a line per rubric surrounded by other text, CRLF line ends, underscores
        (
            "Here are my scores.\r\nCREATIVITY: 8\r\noriginality: 7\r\nnarrative_flow = 9\r\nEmotional-Impact: 6.5\r\n"
            "Imagery: 10 (vivid)\r\nThanks!"
        ),
        # JSON, bare, fenced or nested
        json.dumps({"Creativity": 8, "Originality": 7, "Narrative Flow": 9, "Emotional Impact": 6.5, "Imagery": 10}),
        "```json\n" + json.dumps(EXPECTED) + "\n```",
        json.dumps({"scores": {**EXPECTED, "originality": "7"}}),
        # a reasoning judge: the draft inside the thinking is ignored
        "<think>Creativity: 2, maybe 3. Imagery: 1</think>\n\n" + paper_reply(8, 7, 9, 6.5, 10),
        # the same score twice is fine
        paper_reply(8, 7, 9, 6.5, 10) + "\n\nCreativity: 8",
    ],
)
def test_parse_judge_scores_formats(text):
    assert parse_judge_scores(text) == EXPECTED


@pytest.mark.parametrize(
    "text",
    [
        "",
        "I cannot evaluate this story.",
        paper_reply(8, 7, 9, 6.5, 10).replace("* **Imagery:** 10", ""),  # missing rubric
        paper_reply(8, 7, 9, 6.5, 11),  # out of range
        paper_reply(8, 7, 9, -1, 10),  # negative
        paper_reply(8, 7, 9, 6.5, 10).replace("10", "80/100"),  # another scale: never rescaled
        paper_reply(8, 7, 9, 6.5, 10).replace("** 8", "** 7-8"),  # a range
        paper_reply(8, 7, 9, 6.5, 10).replace("** 8", "** 8 (or 9)"),  # a second number
        paper_reply(8, 7, 9, 6.5, 10) + "\nCreativity: 3",  # two different scores
        paper_reply(8, 7, 9, 6.5, 10).replace("** 8", "** eight"),  # not a number
        "**Creativity:**\n8\n" + paper_reply(8, 7, 9, 6.5, 10).split("\n", 1)[1],  # a score on the next line
        "<think>" + paper_reply(8, 7, 9, 6.5, 10),  # cut inside the thinking
        "The story's creativity: 8, originality: 7, narrative flow: 9, emotional impact: 6, imagery: 10.",  # prose
        json.dumps({**EXPECTED, "imagery": 12}),
        json.dumps({**EXPECTED, "imagery": True}),
        json.dumps({k: v for k, v in EXPECTED.items() if k != "imagery"}),
    ],
)
def test_parse_judge_scores_unparseable(text):
    assert parse_judge_scores(text) is None


# ---------------------------------------------------------------------------------------------------- OpenAI judge


def test_openai_judge_request_and_reply(server):
    judge = make_judge(server)
    server.reply(paper_reply(8, 7, 9, 6.5, 10))
    result = judge.score(CREATIVE_WRITING_PROMPTS[3], "The books were blank.")
    assert result == JudgeResult(scores=EXPECTED, raw=paper_reply(8, 7, 9, 6.5, 10), error=None)

    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {API_KEY}"
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["body"]["model"] == MODEL
    assert request["body"]["messages"] == [
        {"role": "user", "content": build_judge_prompt(CREATIVE_WRITING_PROMPTS[3], "The books were blank.")}
    ]
    # No sampling settings unless asked (GPT-5 only accepts its defaults).
    assert set(request["body"]) == {"model", "messages"}


def test_openai_judge_optional_body_fields(server):
    judge = make_judge(server, temperature=0.0, max_tokens=64, extra_body={"reasoning_effort": "low"})
    judge.score("p", "s")
    assert server.requests[0]["body"]["temperature"] == 0.0
    assert server.requests[0]["body"]["max_tokens"] == 64
    assert server.requests[0]["body"]["reasoning_effort"] == "low"


def test_judge_stories_counts_and_scaling(server, tmp_path, caplog):
    judge = make_judge(server, max_retries=2)
    server.reply(paper_reply(8, 7, 9, 6, 5))  # well-formed
    server.reply("The story is lovely, I would give it high marks overall.")  # unparseable
    server.reply(paper_reply(8, 7, 9, 6, 12))  # out of range -> unparseable
    server.reply({"error": {"message": "overloaded"}}, status=500)  # a server error ...
    server.reply(paper_reply(6, 5, 7, 8, 9))  # ... then success on the retry
    items = [(CREATIVE_WRITING_PROMPTS[i], f"story {i}") for i in range(4)]

    with caplog.at_level(logging.DEBUG):
        summary = judge_stories(judge, items, progress=True, return_results=True)

    assert len(server.requests) == 5  # the 4th story was sent twice
    assert summary["n_items"] == 4
    assert summary["n_scored"] == 2
    assert summary["n_unparseable"] == 2
    assert summary["n_errors"] == 0
    # Means of the two scored stories x10; unparseable replies are not averaged in as 0.
    assert summary["creativity"] == pytest.approx((8 + 6) / 2 * 10)  # 70
    assert summary["originality"] == pytest.approx((7 + 5) / 2 * 10)  # 60
    assert summary["narrative_flow"] == pytest.approx((9 + 7) / 2 * 10)  # 80
    assert summary["emotional_impact"] == pytest.approx((6 + 8) / 2 * 10)  # 70
    assert summary["imagery"] == pytest.approx((5 + 9) / 2 * 10)  # 70
    assert summary["overall"] == pytest.approx((70 + 60 + 80 + 70 + 70) / 5)  # 70
    results = summary["results"]
    assert [r["scores"] is not None for r in results] == [True, False, False, True]
    assert results[1]["raw"].startswith("The story is lovely") and results[1]["error"] is None

    # The key is in no saved file, log record, repr or pickle.
    out = tmp_path / "judge.json"
    out.write_text(json.dumps(summary, indent=2))
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert API_KEY not in path.read_text(errors="replace")
    assert API_KEY not in caplog.text
    assert API_KEY not in repr(judge) and API_KEY not in str(judge)
    assert "'***'" in repr(judge) and MODEL in repr(judge)
    assert API_KEY.encode() not in pickle.dumps(judge)


def test_openai_judge_failures_are_errors_not_zeros(server, caplog):
    judge = make_judge(server, max_retries=1)
    server.reply({"error": "down"}, status=503)
    server.reply({"error": "still down"}, status=503)  # retries exhausted -> error
    server.reply(b"not json at all")  # malformed body: retried ...
    server.reply(paper_reply(1, 2, 3, 4, 5))  # ... and then fine
    server.reply("ECHO_AUTH", status=401)  # not retried (and stops the judge); its body echoes the key
    items = [("p", "a"), ("p", "b"), ("p", "c")]

    with caplog.at_level(logging.WARNING):
        summary = judge_stories(judge, items, progress=False, return_results=True)

    assert len(server.requests) == 5
    assert (summary["n_scored"], summary["n_unparseable"], summary["n_errors"]) == (1, 0, 2)
    assert summary["creativity"] == 10.0 and summary["imagery"] == 50.0 and summary["overall"] == 30.0
    first, second, third = summary["results"]
    assert first["scores"] is None and first["raw"] == "" and first["error"].startswith("HTTP 503")
    assert first["error_kind"] == "HTTP 503" and second["error"] is None
    assert third["error"].startswith("HTTP 401") and "***" in third["error"]
    assert summary["stopped"].startswith("HTTP 401") and "***" in summary["stopped"]
    for text in (json.dumps(summary), caplog.text):
        assert API_KEY not in text


# ------------------------------------------------------------------------------------------------ circuit breaker


@pytest.mark.parametrize("status, hint", [(401, "POLICY_SPLIT_JUDGE_API_KEY"), (403, "may not use"),
                                          (404, "base URL")])  # fmt: skip
def test_an_auth_or_not_found_error_stops_the_judge_at_once(server, status, hint):
    server.always({"error": "no"}, status=status)
    judge = make_judge(server, max_retries=2)
    breaker = JudgeCircuitBreaker()
    items = [("p", str(i)) for i in range(6)]
    summary = judge_stories(judge, items, progress=False, return_results=True, breaker=breaker)
    assert len(server.requests) == 1  # not once per story (nor retried)
    assert (summary["n_errors"], summary["n_skipped"], summary["n_scored"]) == (1, 5, 0)
    assert summary["stopped"].startswith(f"HTTP {status} (") and hint in summary["stopped"]
    assert all(r["error_kind"] == "skipped" and r["error"].startswith("not sent: ") for r in summary["results"][1:])
    # The same breaker stops the next call (e.g. the next mode) before any request.
    again = judge_stories(judge, items, progress=False, breaker=breaker)
    assert len(server.requests) == 1 and again["n_skipped"] == 6 and again["stopped"] == summary["stopped"]


@pytest.mark.parametrize(
    "content, status, kind",
    [({"error": "boom"}, 500, "HTTP 500"), (b"not json at all", 200, "malformed response"),
     ("I refuse to grade stories.", 200, "unparseable reply")],
    ids=["server_error", "malformed_body", "unparseable_reply"],
)  # fmt: skip
def test_repeated_identical_failures_stop_the_judge(server, content, status, kind):
    server.always(content, status=status)
    judge = make_judge(server, max_retries=2)
    summary = judge_stories(judge, [("p", str(i)) for i in range(10)], progress=False)
    n = JUDGE_MAX_CONSECUTIVE_FAILURES
    calls_per_story = 1 if kind == "unparseable reply" else 3  # a failed call is retried max_retries times first
    assert len(server.requests) == n * calls_per_story  # then nothing more: 10 stories would be 10x that
    assert summary["n_scored"] == 0 and summary["n_skipped"] == 10 - n
    assert summary["n_errors"] + summary["n_unparseable"] == n
    assert summary["stopped"].startswith(f"{n} stories in a row failed the same way ({kind})")
    if kind == "unparseable reply":
        assert "I refuse to grade stories." in summary["stopped"]  # the reply, to see what the judge does


def test_mixed_or_interrupted_failures_do_not_stop_the_judge(server):
    judge = make_judge(server, max_retries=0)
    n = JUDGE_MAX_CONSECUTIVE_FAILURES
    # n-1 failures of one kind, a failure of another kind, n-1 of the first again; then n-1, a success, n-1.
    for _ in range(n - 1):
        server.reply({"error": "boom"}, status=500)
    server.reply("unreadable")
    for _ in range(n - 1):
        server.reply({"error": "boom"}, status=500)
    for _ in range(n - 1):
        server.reply("unreadable")
    server.reply(paper_reply(1, 2, 3, 4, 5))
    for _ in range(n - 1):
        server.reply("unreadable")
    items = [("p", str(i)) for i in range(4 * (n - 1) + 2)]
    summary = judge_stories(judge, items, progress=False)
    assert len(server.requests) == len(items) and summary["stopped"] is None and summary["n_skipped"] == 0
    assert (summary["n_scored"], summary["n_errors"]) == (1, 2 * (n - 1))


def test_the_breaker_stops_concurrent_calls(server):
    server.always({"error": "no"}, status=401)
    judge = make_judge(server)
    summary = judge_stories(judge, [("p", str(i)) for i in range(40)], progress=False, num_workers=4)
    assert len(server.requests) <= 4  # at most the calls already in flight when the first 401 came back
    assert summary["n_skipped"] >= 36 and summary["stopped"].startswith("HTTP 401")
    with pytest.raises(ValueError, match="max_consecutive_failures must be an integer >= 1"):
        JudgeCircuitBreaker(0)


def test_openai_judge_does_not_follow_redirects(server):
    # urllib would follow a 302 with a GET that keeps the Authorization header; the judge refuses.
    judge = make_judge(server, max_retries=0)
    server.reply("", status=302, headers={"Location": server.base_url.replace("/v1", "/elsewhere")})
    result = judge.score("p", "s")
    assert result.scores is None and result.error.startswith("HTTP 302")
    assert [r["method"] for r in server.requests] == ["POST"]


def test_openai_judge_unreachable(no_judge_env):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = OpenAIJudge(base_url=f"http://127.0.0.1:{port}/v1", model=MODEL, api_key=API_KEY, max_retries=0)
    result = judge.score("p", "s")
    assert result.scores is None and result.raw == ""
    assert "cannot reach" in result.error and API_KEY not in result.error
    summary = judge_stories(judge, [("p", "s")], progress=False)
    assert summary["n_errors"] == 1 and summary["n_scored"] == 0
    assert all(summary[key] is None for key in (*RUBRICS, "overall"))


def test_openai_judge_concurrent(server):
    judge = make_judge(server)
    summary = judge_stories(judge, [("p", str(i)) for i in range(12)], progress=False, num_workers=4)
    assert summary["n_scored"] == 12 and summary["overall"] == 50.0
    assert len(server.requests) == 12


def test_openai_judge_settings_from_env(server, no_judge_env, monkeypatch):
    monkeypatch.setenv("POLICY_SPLIT_JUDGE_BASE_URL", server.base_url + "/")
    monkeypatch.setenv("POLICY_SPLIT_JUDGE_MODEL", MODEL)
    monkeypatch.setenv("POLICY_SPLIT_JUDGE_API_KEY", API_KEY)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-other")
    judge = OpenAIJudge(retry_backoff=0.0)
    assert judge.url == server.base_url + "/chat/completions"
    assert judge.score("p", "s").scores == dict.fromkeys(RUBRICS, 5.0)
    assert server.requests[-1]["headers"]["Authorization"] == f"Bearer {API_KEY}"
    assert server.requests[-1]["body"]["model"] == MODEL
    assert API_KEY not in repr(judge)

    # OPENAI_* as fallbacks.
    monkeypatch.delenv("POLICY_SPLIT_JUDGE_API_KEY")
    monkeypatch.delenv("POLICY_SPLIT_JUDGE_BASE_URL")
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    OpenAIJudge().score("p", "s")
    assert server.requests[-1]["headers"]["Authorization"] == "Bearer sk-other"


def test_openai_judge_without_key_or_model(server, no_judge_env):
    judge = OpenAIJudge(base_url=server.base_url, model=MODEL)
    assert repr(judge).endswith("api_key=None)")
    judge.score("p", "s")
    assert "Authorization" not in server.requests[-1]["headers"]
    with pytest.raises(ValueError, match="POLICY_SPLIT_JUDGE_MODEL"):
        OpenAIJudge(base_url=server.base_url)
    assert OpenAIJudge(model=MODEL).url == "https://api.openai.com/v1/chat/completions"


# ----------------------------------------------------------------------------------------------- transformers judge


def test_transformers_judge_tiny_model(model, tokenizer, tiny_model_path):
    # A random model's reply is never in the rubric format: unparseable, not an error.
    judge = TransformersJudge(model, tokenizer=tokenizer, max_new_tokens=8, device="cpu")
    result = judge.score(CREATIVE_WRITING_PROMPTS[0], "A door appeared.")
    assert isinstance(result, JudgeResult)
    assert isinstance(result.raw, str) and result.scores is None and result.error is None
    summary = judge_stories(judge, [(CREATIVE_WRITING_PROMPTS[0], "A door appeared.")], progress=False)
    assert (summary["n_scored"], summary["n_unparseable"], summary["n_errors"]) == (0, 1, 0)
    # Greedy: the same reply twice.
    assert judge.score(CREATIVE_WRITING_PROMPTS[0], "A door appeared.").raw == result.raw

    # Loaded from a checkpoint folder.
    from_path = TransformersJudge(tiny_model_path, max_new_tokens=8, device="cpu", dtype="float32")
    assert from_path.score(CREATIVE_WRITING_PROMPTS[0], "A door appeared.").raw == result.raw
    assert "max_new_tokens=8" in repr(from_path)
    with pytest.raises(ValueError, match="tokenizer"):
        TransformersJudge(model)
