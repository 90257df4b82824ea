"""LLM-as-a-judge: prompt, reply parsing, the endpoint judge (the real `openai` client against a local server speaking
the chat-completions wire format) and aggregation."""

from __future__ import annotations

import json
import logging
import pickle
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
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


def api_error(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    """An error body as the OpenAI API (and vLLM) sends it."""
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def bad_request(body: Any) -> str | None:
    """Why a real server would refuse this chat-completions request body (400), `None` if it would not."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "'model' is a required string"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty array"
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
            return f"invalid message {message!r}"
        if not isinstance(message.get("content"), str):
            return f"invalid content in {message!r}"
    return None


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:  # a client that timed out and hung up
        pass


class FakeOpenAIServer:
    """
    A local OpenAI-compatible server: `POST /v1/chat/completions` answers canned replies in order (`default`, a good
    reply unless set with `always`, when none is queued).

    It rejects what a real server rejects: another path (404), another method (405), a body that is not a
    chat-completions request (400), and, when started with `api_key`, a request without `Authorization: Bearer
    <api_key>` (401, as `vllm serve --api-key`). A string reply is sent as a complete chat completion (checked against
    the client's own `ChatCompletion` type below); a dict is sent as JSON, bytes as they are. Every request is recorded
    (`headers` is case-insensitive, as HTTP headers are).
    """

    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.queue: list[tuple[int, Any, dict[str, str], float]] = []
        self.default: tuple[int, Any, dict[str, str], float] = (200, paper_reply(5, 5, 5, 5, 5), {}, 0.0)
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.closing = threading.Event()  # ends a delayed reply at once
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers (and the client's connection pool)

            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self, body: Any) -> None:
                with server.lock:
                    server.requests.append(
                        {"method": self.command, "path": self.path, "headers": self.headers, "body": body}
                    )

            def do_GET(self) -> None:
                self._record(None)
                self._send(405, api_error(f"Method Not Allowed: GET {self.path}"))

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw
                self._record(body)
                if self.path != "/v1/chat/completions":
                    return self._send(404, api_error(f"Not Found: {self.path}"))
                if server.api_key is not None and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    return self._send(401, api_error("Unauthorized", "authentication_error"))
                if (problem := bad_request(body)) is not None:
                    return self._send(400, api_error(problem))
                with server.lock:
                    status, payload, headers, delay = server.queue.pop(0) if server.queue else server.default
                if delay:
                    server.closing.wait(delay)
                if payload == "ECHO_AUTH":  # a server that (badly) echoes credentials in its error body
                    payload = {"error": f"invalid key {self.headers.get('Authorization')}"}
                if status == 200 and isinstance(payload, str):
                    payload = chat_completion(payload, body["model"])
                self._send(status, payload, headers)

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.base_url = f"{self.origin}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def reply(
        self, content: Any, status: int = 200, headers: dict[str, str] | None = None, delay: float = 0.0
    ) -> None:
        """Queue one answer; `delay`: seconds before it is sent."""
        self.queue.append((status, content, headers or {}, delay))

    def always(self, content: Any, status: int = 200) -> None:
        """Answer every request that finds the queue empty with this (a persistent failure)."""
        self.default = (status, content, {}, 0.0)

    def close(self) -> None:
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def chat_completion(content: str, model: str) -> dict[str, Any]:
    """A complete `chat.completion` object, as the OpenAI API and vLLM send it."""
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


@pytest.fixture
def sleeps(monkeypatch):
    """The client's waits between retries, recorded instead of slept."""
    waited: list[float] = []
    monkeypatch.setattr("time.sleep", waited.append)
    return waited


@pytest.fixture
def server(sleeps):
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
    return OpenAIJudge(**{"base_url": server.base_url, "model": MODEL, "api_key": API_KEY, **kwargs})


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


def post(url: str, body: Any, method: str = "POST") -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data if method == "POST" else None, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_fake_server_speaks_the_wire_format(server):
    from openai.types.chat import ChatCompletion

    url = server.base_url + "/chat/completions"
    status, payload = post(url, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200
    completion = ChatCompletion.model_validate(payload, strict=True)  # every required field, of the right type
    assert completion.choices[0].message.content == paper_reply(5, 5, 5, 5, 5) and completion.model == MODEL
    # What a real server refuses, it refuses.
    assert post(server.origin + "/v1/completions", {"model": MODEL, "prompt": "hi"})[0] == 404
    assert post(url, None, method="GET")[0] == 405
    for body in (
        b"not json",
        [],
        {"messages": [{"role": "user", "content": "hi"}]},
        {"model": MODEL},
        {"model": MODEL, "messages": []},
        {"model": MODEL, "messages": [{"role": "judge", "content": "x"}]},
    ):
        status, payload = post(url, body)
        assert status == 400 and payload["error"]["type"] == "invalid_request_error", body
    keyed = FakeOpenAIServer(api_key=API_KEY)
    try:
        status, payload = post(keyed.base_url + "/chat/completions", {"model": MODEL, "messages": []})
        assert status == 401 and payload["error"]["type"] == "authentication_error"
    finally:
        keyed.close()


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
    server.reply(api_error("overloaded", "server_error"), status=500)  # a server error ...
    server.reply(paper_reply(6, 5, 7, 8, 9))  # ... then success on the retry
    items = [(CREATIVE_WRITING_PROMPTS[i], f"story {i}") for i in range(4)]

    with caplog.at_level(logging.DEBUG):  # the client's own debug logs included
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

    # The key went in the Authorization header of every request, and is in no saved file, log record, repr or pickle.
    assert all(r["headers"]["Authorization"] == f"Bearer {API_KEY}" for r in server.requests)
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
    server.reply({"error": "down"}, status=503)  # retried ...
    server.reply(paper_reply(1, 2, 3, 4, 5))  # ... and then fine
    server.reply(b"not json at all")  # malformed: an error at once (a 200 is not retried)
    # Not retried (and stops the judge); its body echoes the key, as the OpenAI API does (there, masked).
    server.reply(api_error(f"Incorrect API key provided: {API_KEY}", "authentication_error"), status=401)
    items = [("p", "a"), ("p", "b"), ("p", "c"), ("p", "d")]

    with caplog.at_level(logging.DEBUG):
        summary = judge_stories(judge, items, progress=False, return_results=True)

    assert len(server.requests) == 6
    assert (summary["n_scored"], summary["n_unparseable"], summary["n_errors"]) == (1, 0, 3)
    assert summary["creativity"] == 10.0 and summary["imagery"] == 50.0 and summary["overall"] == 30.0
    first, second, third, fourth = summary["results"]
    assert first["scores"] is None and first["raw"] == "" and first["error"].startswith("HTTP 503")
    assert first["error_kind"] == "HTTP 503" and second["error"] is None
    assert third["error_kind"] == "malformed response" and third["raw"] == ""
    assert fourth["error"].startswith("HTTP 401") and "Incorrect API key provided: ***" in fourth["error"]
    assert summary["stopped"].startswith("HTTP 401") and "***" in summary["stopped"]
    for text in (json.dumps(summary), caplog.text):
        assert API_KEY not in text


def test_an_error_body_echoing_the_authorization_header_is_redacted(server):
    judge = make_judge(server, max_retries=0)
    server.reply("ECHO_AUTH", status=400)
    result = judge.score("p", "s")
    assert result.error == f'HTTP 400 from {judge.url}: {{"error": "invalid key Bearer ***"}}'
    assert API_KEY not in json.dumps(result.__dict__)


@pytest.mark.parametrize(
    "body",
    [
        b"not json at all",
        b"<html>Bad gateway</html>",
        {},
        {"choices": []},
        [1, 2],
        {"choices": [{"index": 0, "message": {"role": "assistant", "content": None}}]},
        {"choices": [{"index": 0, "message": {"role": "assistant", "content": 7}}]},
    ],
    ids=["not_json", "html", "empty_object", "no_choices", "array", "null_content", "number_content"],
)
def test_openai_judge_rejects_malformed_responses(server, body):
    # A 200 whose body is not a chat completion with text: an error (not a reply to parse, nor a score of 0), and not
    # retried (the client retries only failed requests).
    judge = make_judge(server, max_retries=2)
    server.reply(body)
    result = judge.score("p", "s")
    assert result.scores is None and result.raw == "" and result.error_kind == "malformed response"
    assert result.error.startswith(f"malformed response from {judge.url}")
    assert len(server.requests) == 1


def test_openai_judge_content_as_typed_parts(server):
    parts = [
        {"type": "text", "text": paper_reply(8, 7, 9, 6.5, 10)[:20]},
        {"type": "text", "text": paper_reply(8, 7, 9, 6.5, 10)[20:]},
    ]
    server.reply(
        {
            **chat_completion("", MODEL),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": parts}, "finish_reason": "stop"}],
        }
    )
    assert make_judge(server).score("p", "s").scores == EXPECTED


def test_openai_judge_retries_are_bounded_with_backoff(server, sleeps):
    # A server error, every time: max_retries + 1 requests, then an error; waits growing between them.
    server.always(api_error("overloaded", "server_error"), status=500)
    result = make_judge(server, max_retries=3).score("p", "s")
    assert result.error_kind == "HTTP 500" and len(server.requests) == 4
    assert len(sleeps) == 3 and 0 < sleeps[0] < sleeps[1] < sleeps[2] <= 8

    # A rate limit: the server's Retry-After is honoured, then the retry succeeds.
    server.requests.clear(), sleeps.clear(), server.always(paper_reply(5, 5, 5, 5, 5))
    server.reply(api_error("slow down", "rate_limit_error"), status=429, headers={"Retry-After": "3"})
    assert make_judge(server, max_retries=1).score("p", "s").scores == dict.fromkeys(RUBRICS, 5.0)
    assert len(server.requests) == 2 and sleeps == [3.0]

    # No retries: one request.
    server.requests.clear(), sleeps.clear()
    server.reply(api_error("overloaded", "server_error"), status=503)
    assert make_judge(server, max_retries=0).score("p", "s").error_kind == "HTTP 503"
    assert len(server.requests) == 1 and sleeps == []


def test_openai_judge_timeout(server):
    # The server answers after 5 s, the judge waits 0.2 s per request: two requests, then a timeout error.
    for _ in range(2):
        server.reply(paper_reply(5, 5, 5, 5, 5), delay=5.0)
    start = time.monotonic()
    result = make_judge(server, timeout=0.2, max_retries=1).score("p", "s")
    assert time.monotonic() - start < 4
    assert result.scores is None and result.error_kind == "timeout" and "within 0.2 s" in result.error
    assert len(server.requests) == 2


# ------------------------------------------------------------------------------------------------ circuit breaker


@pytest.mark.parametrize(
    "status, hint", [(401, "POLICY_SPLIT_JUDGE_API_KEY"), (403, "may not use"), (404, "base URL")]
)
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


def test_a_wrong_key_or_path_stops_the_judge_at_once(sleeps):
    # The server's own refusals (not canned replies): vLLM started with --api-key, a base_url without /v1.
    keyed = FakeOpenAIServer(api_key="sk-the-right-one")
    try:
        summary = judge_stories(make_judge(keyed), [("p", str(i)) for i in range(3)], progress=False)
        assert len(keyed.requests) == 1 and summary["stopped"].startswith("HTTP 401 (")
        judge = OpenAIJudge(base_url=keyed.origin, model=MODEL, api_key="sk-the-right-one")
        summary = judge_stories(judge, [("p", str(i)) for i in range(3)], progress=False)
        assert keyed.requests[-1]["path"] == "/chat/completions" and summary["stopped"].startswith("HTTP 404 (")
        assert "base URL" in summary["stopped"]
    finally:
        keyed.close()


@pytest.mark.parametrize(
    "content, status, kind",
    [
        ({"error": "boom"}, 500, "HTTP 500"),
        (b"not json at all", 200, "malformed response"),
        ("I refuse to grade stories.", 200, "unparseable reply"),
    ],
    ids=["server_error", "malformed_body", "unparseable_reply"],
)
def test_repeated_identical_failures_stop_the_judge(server, content, status, kind):
    server.always(content, status=status)
    judge = make_judge(server, max_retries=2)
    summary = judge_stories(judge, [("p", str(i)) for i in range(10)], progress=False)
    n = JUDGE_MAX_CONSECUTIVE_FAILURES
    calls_per_story = 3 if kind == "HTTP 500" else 1  # a failed request is retried max_retries times first
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


# ------------------------------------------------------------------------------------------ endpoint settings, key


def test_a_redirect_to_another_host_does_not_carry_the_key(server):
    elsewhere = FakeOpenAIServer()
    try:
        server.reply("", status=307, headers={"Location": elsewhere.base_url + "/chat/completions"})
        result = make_judge(server, max_retries=0).score("p", "s")
        if elsewhere.requests:
            # Followed (recent `openai` versions): 307 keeps the method and body, the other host gets the same request
            # without the Authorization header.
            (redirected,) = elsewhere.requests
            assert redirected["method"] == "POST" and redirected["body"]["model"] == MODEL
            assert "Authorization" not in redirected["headers"] and API_KEY not in str(redirected["headers"])
            assert result.scores == dict.fromkeys(RUBRICS, 5.0)
        else:  # not followed (older versions, e.g. 1.0): an error, and nothing sent elsewhere
            assert result.error_kind == "HTTP 307"
    finally:
        elsewhere.close()


def test_openai_judge_unreachable(no_judge_env):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = OpenAIJudge(base_url=f"http://127.0.0.1:{port}/v1", model=MODEL, api_key=API_KEY, max_retries=0)
    result = judge.score("p", "s")
    assert result.scores is None and result.raw == "" and result.error_kind == "unreachable"
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
    judge = OpenAIJudge()
    assert judge.url == server.base_url + "/chat/completions"
    assert judge.score("p", "s").scores == dict.fromkeys(RUBRICS, 5.0)
    assert server.requests[-1]["headers"]["Authorization"] == f"Bearer {API_KEY}"
    assert server.requests[-1]["body"]["model"] == MODEL
    assert API_KEY not in repr(judge)
    # Pickled without the key; unpickled (e.g. in a worker process), it takes it from the environment again.
    restored = pickle.loads(pickle.dumps(judge))
    assert restored.score("p", "s").scores == dict.fromkeys(RUBRICS, 5.0)
    assert server.requests[-1]["headers"]["Authorization"] == f"Bearer {API_KEY}"

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
    # The client needs a key: the placeholder that keyless servers (vLLM, SGLang, TGI) ignore.
    assert server.requests[-1]["headers"]["Authorization"] == "Bearer EMPTY"
    with pytest.raises(ValueError, match="POLICY_SPLIT_JUDGE_MODEL"):
        OpenAIJudge(base_url=server.base_url)
    assert OpenAIJudge(model=MODEL).url == "https://api.openai.com/v1/chat/completions"


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            {"base_url": "localhost:8000/v1"},
            r"base_url 'localhost:8000/v1' \(from .*\) is not an http\(s\) URL: pass the API root, e\.g\.",
        ),
        (
            {"base_url": "ftp://example.com/v1"},
            r"\$POLICY_SPLIT_JUDGE_BASE_URL or \$OPENAI_BASE_URL\) is not an http",
        ),
        ({"base_url": "http:///v1"}, r"is not an http\(s\) URL"),
        (
            {"base_url": "http://h:8000/v1/chat/completions/"},
            r"must end before /chat/completions, .*: pass 'http://h:8000/v1'",
        ),
        ({"max_retries": -1}, r"`max_retries` must be an integer >= 0, got -1"),
        ({"max_retries": 1.5}, r"`max_retries` must be an integer >= 0"),
        ({"timeout": 0}, r"`timeout` must be a number of seconds > 0, got 0"),
    ],
)
def test_openai_judge_bad_settings_fail_at_once(no_judge_env, settings, message):
    with pytest.raises(ValueError, match=message):
        OpenAIJudge(**{"base_url": "http://localhost:8000/v1", "model": MODEL, **settings})


def test_without_openai_the_endpoint_judge_says_how_to_install_it(monkeypatch, server):
    monkeypatch.setitem(sys.modules, "openai", None)  # `import openai` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'policy-split-trl\[judge\]'"):
        make_judge(server)
    # Nothing else needs it: parsing and aggregation with any other judge.
    assert parse_judge_scores(paper_reply(1, 2, 3, 4, 5)) is not None

    class Canned:
        def score(self, prompt: str, story: str) -> JudgeResult:
            return JudgeResult(scores=parse_judge_scores(paper_reply(5, 5, 5, 5, 5)), raw="")

    assert judge_stories(Canned(), [("p", "s")], progress=False)["overall"] == 50.0


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
