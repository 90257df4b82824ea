"""LLM-as-a-judge for the creative writing stories (paper Section 4.3, Table 2, Appendix C.3).

A judge model scores each story on five rubrics (creativity, originality, narrative flow, emotional impact, imagery)
from 0 to 10 with the paper's prompt ([`JUDGE_PROMPT`]); [`judge_stories`] averages them and scales them to 0-100 as
in Table 2 (the paper's main judge is GPT-5). Two judges share one interface, `judge.score(prompt, story)`:

- [`OpenAIJudge`]: any OpenAI-compatible `POST {base_url}/chat/completions` endpoint (OpenAI, vLLM, SGLang, TGI,
  ...), through the official `openai` client (`pip install 'policy-split-trl[judge]'`);
- [`TransformersJudge`]: a local `transformers` chat model, greedy decoding.

A reply that cannot be parsed, or a request that fails, is counted and reported, never scored 0. A judge that keeps
failing the same way is stopped by a [`JudgeCircuitBreaker`] instead of being asked about every story: at once on HTTP
401/403/404 (a wrong key, model or URL: no later call can succeed), after [`JUDGE_MAX_CONSECUTIVE_FAILURES`] stories
in a row that failed the same way otherwise (the same HTTP status after the client's retries, an unreachable or
timing-out endpoint, malformed responses, unparseable replies); the reason is returned as `"stopped"`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import openai
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Keys of the parsed scores, in the order of the paper's rubric and of Table 2's columns.
RUBRICS: tuple[str, ...] = ("creativity", "originality", "narrative_flow", "emotional_impact", "imagery")
RUBRIC_NAMES: dict[str, str] = {
    "creativity": "Creativity",
    "originality": "Originality",
    "narrative_flow": "Narrative Flow",
    "emotional_impact": "Emotional Impact",
    "imagery": "Imagery",
}
MIN_SCORE = 0.0
MAX_SCORE = 10.0
# Table 2 reports the 0-10 scores "scaled at 100".
SCORE_SCALE = 10.0

# Appendix C.3 ("Creative Writing Evaluation"), verbatim up to OCR repairs: "( to 10" -> "0 to 10", "Qriginal" ->
# "Original", "4," -> "4.", the garbled "* *#*Creativity:**" / "* *#*Qriginality:**" output lines written like the
# three clean ones ("* **Narrative Flow:** [Score]"), no space before a closing "**", line-break hyphenations undone
# and the `{prompt}` / `{story}` placeholders (printed as "prompt" / "story" in the paper) restored. The PDF does not
# show indentation: the nesting of the High/Low bullets under their rubric is ours.
JUDGE_PROMPT = """\
You are an expert literary critic and creative writing judge with an eye for technical skill, emotional depth, and \
narrative innovation. Please evaluate the following story based on the provided prompt. You will score the story \
across five specific dimensions on a scale of **0 to 10**.

### Evaluation Rubric

1. **Creativity (Novelty and uniqueness of ideas):**
    * *High Score:* The story explores unconventional concepts, unexpected plot twists, or unique world-building.
    * *Low Score:* The story relies heavily on clichés or predictable tropes.

2. **Originality (Innovative approach to the prompt):**
    * *High Score:* The author interpreted the prompt in a way that is fresh or subverts expectations.
    * *Low Score:* The author took the most literal or common interpretation of the prompt.

3. **Narrative Flow (Coherence and story progression):**
    * *High Score:* The story moves logically and smoothly; the pacing feels intentional and keeps the reader \
engaged.
    * *Low Score:* The story feels disjointed, confusing, or has significant pacing issues (e.g., a rushed ending).

4. **Emotional Impact (Ability to evoke feelings):**
    * *High Score:* The writing makes the reader feel a specific emotion (sadness, joy, tension, etc.) through \
character depth or stakes.
    * *Low Score:* The writing feels clinical, flat, or fails to make the reader care about the outcome.

5. **Imagery (Vividness of descriptions):**
    * *High Score:* Rich, sensory details that allow the reader to "see" and "feel" the environment.
    * *Low Score:* Vague or generic descriptions; over-reliance on "telling" rather than "showing."

### Input Data

**Original Prompt:**
{prompt}

**Story to Evaluate:**
{story}

### Output Format

Please provide your evaluation in the following format:

* **Creativity:** [Score]
* **Originality:** [Score]
* **Narrative Flow:** [Score]
* **Emotional Impact:** [Score]
* **Imagery:** [Score]

Directly output the scores in the above format, without any additional explanations."""


def build_judge_prompt(prompt: str, story: str) -> str:
    """
    Fill [`JUDGE_PROMPT`] with a story prompt and the story to score.

    Args:
        prompt (`str`):
            The creative writing prompt the story answers (e.g. one of `CREATIVE_WRITING_PROMPTS`).
        story (`str`):
            The story (without the writer's thinking).

    Returns:
        `str`: The judge's user message.
    """
    # `str.format` only interprets braces of the template, so braces inside the story are safe.
    return JUDGE_PROMPT.format(prompt=prompt, story=story)


# --------------------------------------------------------------------------------------------------------- parsing

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_RUBRIC_ALTERNATION = r"creativity|originality|narrative[ \t_-]*flow|emotional[ \t_-]*impact|imagery"
# One "<rubric>: <score>" line, with markdown around it: a bullet or number, bold/italic marks, the rubric's
# parenthesised description, "[8]", "8/10", "8 out of 10", "**8**". The rubric must open the line so that a rubric
# word inside a sentence is never read as a score.
_SCORE_LINE = re.compile(
    r"^[ \t>#*_+\-•]*(?:\d+[.)][ \t]*)?[ \t*_]*"
    rf"(?P<name>{_RUBRIC_ALTERNATION})"
    r"[ \t*_]*(?:\([^)\n]*\))?[ \t*_]*[:=：][ \t*_]*\[?[ \t]*"
    rf"(?P<score>{_NUMBER})"
    rf"[ \t]*\]?(?:[ \t]*(?:/|out[ \t]+of)[ \t]*(?P<denominator>{_NUMBER}))?"
    r"(?P<rest>[^\n]*)$",
    re.IGNORECASE | re.MULTILINE,
)
_JSON_FENCE = re.compile(r"```(?:json)?\s*(\{.*?\})\s*```", re.DOTALL | re.IGNORECASE)


def _rubric_key(name: str) -> str | None:
    key = re.sub(r"[\s_\-*]+", "_", name.strip().strip("*_ ").lower())
    return key if key in RUBRICS else None


def _strip_thinking(text: str) -> str | None:
    # A reasoning judge drafts scores in its thinking; only the final answer counts. An unclosed thinking block means
    # the reply was cut before any answer.
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        return None
    return text


def _valid_score(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        if not re.fullmatch(rf"\s*{_NUMBER}\s*", value):
            return None
        value = float(value)
    if not isinstance(value, (int, float)):
        return None
    value = float(value)
    if not math.isfinite(value) or not MIN_SCORE <= value <= MAX_SCORE:
        return None
    return value


def _parse_json_scores(text: str) -> dict[str, float] | None | bool:
    """JSON reply: the scores, `None` if it is JSON with rubric keys but invalid, `False` if it is not such JSON."""
    fenced = _JSON_FENCE.search(text)
    if fenced:
        candidate = fenced.group(1)
    elif "{" in text and "}" in text:
        candidate = text[text.find("{") : text.rfind("}") + 1]
    else:
        return False
    try:
        data = json.loads(candidate)
    except ValueError:
        return False
    if not isinstance(data, dict):
        return False
    found = {_rubric_key(k): v for k, v in data.items() if isinstance(k, str) and _rubric_key(k)}
    if not found:
        # {"scores": {...}}: one level of nesting is a common way to wrap them.
        nested = [v for v in data.values() if isinstance(v, dict)]
        if len(nested) != 1:
            return False
        found = {_rubric_key(k): v for k, v in nested[0].items() if isinstance(k, str) and _rubric_key(k)}
        if not found:
            return False
    scores = {key: _valid_score(found.get(key)) for key in RUBRICS}
    if any(score is None for score in scores.values()):
        return None
    return scores


def parse_judge_scores(text: str) -> dict[str, float] | None:
    """
    Read the five rubric scores from a judge's reply.

    Understands the paper's format (`* **Creativity:** 8`, one rubric a line) and reasonable variants:
    `Creativity: 8`, `**Creativity**: 8/10`, `1. Creativity (Novelty ...): [8]`, `Narrative_Flow = 7.5`, and a JSON
    object (optionally fenced, or nested one level as `{"scores": {...}}`) with the rubric names as keys. A reasoning
    model's thinking (`... </think>`) is ignored. Nothing is guessed: the reply is unparseable (`None`) when a rubric
    is missing, a score is outside `[0, 10]`, out of another maximum than 10 (`8/100`), a rubric gets two different
    scores, or a score line carries another number after its score (`7-8`, `7 (or 8)`).

    Args:
        text (`str`):
            The judge's reply.

    Returns:
        `dict[str, float]` or `None`: The scores (0-10) keyed by [`RUBRICS`], or `None` if the reply is unparseable.
    """
    if not isinstance(text, str):
        return None
    answer = _strip_thinking(text)
    if answer is None or not answer.strip():
        return None

    from_json = _parse_json_scores(answer)
    if from_json is not False:
        return from_json

    scores: dict[str, float] = {}
    for match in _SCORE_LINE.finditer(answer):
        key = _rubric_key(match.group("name"))
        denominator = match.group("denominator")
        if denominator is not None and float(denominator) != MAX_SCORE:
            return None
        if re.search(r"\d", match.group("rest")):
            return None
        score = _valid_score(match.group("score"))
        if key is None or score is None:
            return None
        if key in scores and scores[key] != score:
            return None
        scores[key] = score
    if set(scores) != set(RUBRICS):
        return None
    return {key: scores[key] for key in RUBRICS}


# ---------------------------------------------------------------------------------------------------------- judges


@dataclass
class JudgeResult:
    """
    The judge's verdict on one story.

    Args:
        scores (`dict[str, float]` or `None`):
            The five rubric scores (0-10) keyed by [`RUBRICS`]; `None` if the reply was unparseable or the call failed.
        raw (`str`):
            The judge's reply (empty if the call failed).
        error (`str` or `None`):
            Why the call failed (never containing credentials), `None` if the judge replied.
        error_kind (`str` or `None`):
            The class of the failure, the same for failures that would repeat (`"HTTP 500"`, `"unreachable"`,
            `"timeout"`, `"malformed response"`, ...; `"skipped"` for a story not sent because the judge was stopped);
            `None` if the judge replied.
    """

    scores: dict[str, float] | None
    raw: str
    error: str | None = None
    error_kind: str | None = None


class Judge(Protocol):
    """Anything with `score(prompt, story) -> JudgeResult` can be passed to [`judge_stories`]."""

    def score(self, prompt: str, story: str) -> JudgeResult: ...


class JudgeRequestError(RuntimeError):
    """
    A judge call failed (HTTP error, timeout, malformed response). Its message never contains credentials.

    Args:
        message (`str`):
            What failed.
        kind (`str`, *optional*, defaults to `"error"`):
            The class of the failure (see [`JudgeResult`]'s `error_kind`).
    """

    def __init__(self, message: str, kind: str = "error"):
        super().__init__(message)
        self.kind = kind


class _ChatJudge:
    """Shared `score`: fill the paper's prompt, ask the model, parse the reply."""

    def _complete(self, messages: list[dict[str, str]]) -> str:
        raise NotImplementedError

    def score(self, prompt: str, story: str) -> JudgeResult:
        """
        Score one story with the paper's judge prompt.

        Args:
            prompt (`str`):
                The creative writing prompt the story answers.
            story (`str`):
                The story to score (without the writer's thinking).

        Returns:
            [`JudgeResult`]: The parsed scores (or `None`), the raw reply and the error of a failed call.
        """
        messages = [{"role": "user", "content": build_judge_prompt(prompt, story)}]
        try:
            raw = self._complete(messages)
        except JudgeRequestError as error:
            return JudgeResult(scores=None, raw="", error=str(error), error_kind=error.kind)
        return JudgeResult(scores=parse_judge_scores(raw), raw=raw)


DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
# Sent without a configured key: the `openai` client requires one, and a server started without keys (vLLM, SGLang,
# TGI) ignores it. "EMPTY" is vLLM's documented placeholder.
NO_API_KEY = "EMPTY"
_MAX_ERROR_BODY_CHARS = 300


def _check_base_url(base_url: str) -> str:
    """The API root without its trailing `/`, or a `ValueError` saying what to pass instead."""
    root = base_url.strip().rstrip("/")
    parts = urllib.parse.urlsplit(root)
    where = "from `base_url=`, --judge_base_url, $POLICY_SPLIT_JUDGE_BASE_URL or $OPENAI_BASE_URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"The judge's base_url {base_url!r} ({where}) is not an http(s) URL: pass the API root, e.g. "
            f"{DEFAULT_OPENAI_BASE_URL} or http://localhost:8000/v1."
        )
    if root.endswith("/chat/completions"):
        raise ValueError(
            f"The judge's base_url {base_url!r} ({where}) must end before /chat/completions, which is added to it: "
            f"pass {root.removesuffix('/chat/completions')!r}."
        )
    return root


def _message_content(completion: Any) -> str:
    # The client does not validate responses: a body without `choices` still comes back as a `ChatCompletion`.
    try:
        content = completion.choices[0].message.content
    except (AttributeError, IndexError, KeyError, TypeError):
        content = None
    if isinstance(content, list):  # some servers return the content as a list of typed parts
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str):
        raise TypeError("no text at choices[0].message.content")
    return content


class OpenAIJudge(_ChatJudge):
    """
    Judge served by any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, SGLang, TGI, LiteLLM, ...), called
    with the official `openai` client (`pip install 'policy-split-trl[judge]'`).

    The client retries a timeout, a connection error and HTTP 408/409/429/5xx at most `max_retries` times, after the
    server's `Retry-After`, else 0.5 s doubled at each retry (up to 8 s, less up to 25% jitter). Other HTTP errors
    (401, 404, ...) and a response that is not a chat completion fail at once.

    The API key is sent as `Authorization: Bearer <key>` and never printed, logged, saved, pickled or put in an error
    message or `repr`: an error body that echoes it is redacted, an unpickled judge (e.g. in a worker process) takes
    it from the environment again, and a redirect to another host does not carry it (the client drops the header).

    Args:
        base_url (`str`, *optional*):
            API root, requests go to `{base_url}/chat/completions`. Defaults to `$POLICY_SPLIT_JUDGE_BASE_URL`, then
            `$OPENAI_BASE_URL`, then `https://api.openai.com/v1`.
        model (`str`, *optional*):
            Judge model name (the paper's main judge is GPT-5). Defaults to `$POLICY_SPLIT_JUDGE_MODEL`; required.
        api_key (`str`, *optional*):
            Defaults to `$POLICY_SPLIT_JUDGE_API_KEY`, then `$OPENAI_API_KEY`. Without one, the placeholder `"EMPTY"`
            is sent (a server started without keys, e.g. a local vLLM, ignores it).
        timeout (`float`, *optional*, defaults to `60`):
            Seconds per HTTP request.
        max_retries (`int`, *optional*, defaults to `2`):
            Retries of a failed request (see above): at most `max_retries + 1` requests a story.
        temperature (`float`, *optional*):
            Sampling temperature; not sent by default (the paper does not give one, and GPT-5 only accepts its
            default).
        max_tokens (`int`, *optional*):
            Sent as `max_tokens` when given (for OpenAI reasoning models use
            `extra_body={"max_completion_tokens": ...}` instead).
        extra_body (`dict`, *optional*):
            More fields for the request body (e.g. `{"reasoning_effort": "low"}`).
    """

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 60,
        max_retries: int = 2,
        temperature: float | None = None,
        max_tokens: int | None = None,
        extra_body: dict[str, Any] | None = None,
    ):
        base_url = (
            base_url
            or os.environ.get("POLICY_SPLIT_JUDGE_BASE_URL")
            or os.environ.get("OPENAI_BASE_URL")
            or DEFAULT_OPENAI_BASE_URL
        )
        model = model or os.environ.get("POLICY_SPLIT_JUDGE_MODEL")
        if not model:
            raise ValueError("No judge model: pass `model=` or set the POLICY_SPLIT_JUDGE_MODEL environment variable.")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"`max_retries` must be an integer >= 0, got {max_retries!r}.")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"`timeout` must be a number of seconds > 0, got {timeout!r}.")
        self.base_url = _check_base_url(base_url)
        self.model = model
        self.timeout = timeout
        self.max_retries = max_retries
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.extra_body = dict(extra_body or {})
        self._api_key = (
            api_key or os.environ.get("POLICY_SPLIT_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY") or None
        )
        self._client = self._make_client()

    def _make_client(self) -> openai.OpenAI:
        # Imported here: parsing, aggregation and the local judge do not need `openai`.
        try:
            import openai
        except ImportError as error:
            raise ImportError(
                "The endpoint judge (judge base_url/model, --judge_base_url, OpenAIJudge) needs the `openai` client: "
                "pip install 'policy-split-trl[judge]'. A local judge (judge local_model) does not."
            ) from error
        api_key = self._api_key or NO_API_KEY
        return openai.OpenAI(
            base_url=self.base_url, api_key=api_key, timeout=self.timeout, max_retries=self.max_retries
        )

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def __repr__(self) -> str:
        key = "'***'" if self._api_key else "None"
        return f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r}, api_key={key})"

    def __getstate__(self) -> dict[str, Any]:
        # A pickled judge (e.g. sent to a worker process) must not carry the key to disk; the client holds it too.
        state = self.__dict__.copy()
        state["_api_key"] = None
        state.pop("_client", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._api_key = os.environ.get("POLICY_SPLIT_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY") or None
        self._client = self._make_client()

    def _failure(self, error: str, kind: str) -> JudgeRequestError:
        if self._api_key:  # a server may echo the key in its error body
            error = error.replace(self._api_key, "***")
        logger.warning("Judge call failed: %s", error)
        return JudgeRequestError(error, kind)

    def _complete(self, messages: list[dict[str, str]]) -> str:
        import openai

        options = {"temperature": self.temperature, "max_tokens": self.max_tokens}
        options = {key: value for key, value in options.items() if value is not None}
        # `from None` throughout: the client's exceptions hold the request, and so its headers.
        try:
            completion = self._client.chat.completions.create(
                model=self.model, messages=messages, extra_body=self.extra_body or None, **options
            )
        except openai.APIStatusError as exc:  # not retried, or still failing after the retries
            # Only the status and a bit of the body: the body may help (e.g. "model not found"), headers never.
            detail = exc.response.text.strip()[:_MAX_ERROR_BODY_CHARS]
            error = f"HTTP {exc.status_code} from {self.url}" + (f": {detail}" if detail else "")
            raise self._failure(error, f"HTTP {exc.status_code}") from None
        except openai.APITimeoutError:  # a subclass of APIConnectionError
            raise self._failure(f"no reply from {self.url} within {self.timeout} s", "timeout") from None
        except openai.APIConnectionError as exc:
            raise self._failure(f"cannot reach {self.url}: {exc.__cause__ or exc}", "unreachable") from None
        except ValueError as exc:  # the body is not JSON
            raise self._failure(f"malformed response from {self.url}: {exc}", "malformed response") from None
        try:
            return _message_content(completion)
        except TypeError as exc:
            raise self._failure(f"malformed response from {self.url}: {exc}", "malformed response") from None


class TransformersJudge(_ChatJudge):
    """
    Judge run locally with `transformers`: the paper's prompt as a user turn of the model's chat template, greedy
    decoding.

    Args:
        model_name_or_path (`str` or `PreTrainedModel`):
            A causal LM (Hub id or local folder), or an already loaded model.
        tokenizer (`str` or `PreTrainedTokenizerBase`, *optional*):
            Defaults to the tokenizer of `model_name_or_path` (required if a model object is passed).
        max_new_tokens (`int`, *optional*, defaults to `256`):
            The answer takes ~50 tokens; a thinking judge needs far more (or `chat_template_kwargs` turning thinking
            off, e.g. `{"enable_thinking": False}` for Qwen3). A reply cut inside its thinking is unparseable.
        device (`str` or `torch.device`, *optional*):
            Where to run; defaults to CUDA when available, else CPU. A passed model is only moved if this is given.
        dtype (`str` or `torch.dtype`, *optional*, defaults to `"auto"`):
            Loading dtype.
        chat_template_kwargs (`dict`, *optional*):
            Extra arguments for `apply_chat_template`.
        model_init_kwargs (`dict`, *optional*):
            Extra arguments for `AutoModelForCausalLM.from_pretrained`.
    """

    def __init__(
        self,
        model_name_or_path: str | PreTrainedModel,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        max_new_tokens: int = 256,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "auto",
        chat_template_kwargs: dict[str, Any] | None = None,
        model_init_kwargs: dict[str, Any] | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if isinstance(model_name_or_path, str):
            self.name = model_name_or_path
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=dtype, **(model_init_kwargs or {}))
            model = model.to(device)
        else:
            self.name = getattr(model_name_or_path.config, "_name_or_path", "") or type(model_name_or_path).__name__
            model = model_name_or_path if device is None else model_name_or_path.to(device)
            if tokenizer is None:
                raise ValueError("Pass `tokenizer=` along with a model object.")
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer or model_name_or_path)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.chat_template_kwargs = dict(chat_template_kwargs or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.name!r}, max_new_tokens={self.max_new_tokens})"

    def _complete(self, messages: list[dict[str, str]]) -> str:
        import torch
        from transformers import GenerationConfig

        inputs = self.tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            **self.chat_template_kwargs,
        ).to(self.model.device)
        # A fresh config: the model's own one may ask for sampling (e.g. Qwen3's temperature 0.6), the judge is greedy.
        eos_token_id = getattr(self.model.generation_config, "eos_token_id", None) or self.tokenizer.eos_token_id
        pad_token_id = self.tokenizer.pad_token_id
        if pad_token_id is None:
            pad_token_id = eos_token_id[0] if isinstance(eos_token_id, list) else eos_token_id
        generation_config = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
        with torch.inference_mode():
            output = self.model.generate(**inputs, generation_config=generation_config)
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------------- circuit breaker

# Stories in a row that failed the same way (each call already retried `max_retries` times) before the judge is
# stopped: a persistent server error or malformed reply costs ~3 s a story with the default retries, and a judge that
# answers nothing readable three times in a row is not going to score the rest.
JUDGE_MAX_CONSECUTIVE_FAILURES = 3
# Failures no later call can avoid: the judge is stopped at the first one.
STOP_AT_ONCE: dict[str, str] = {
    "HTTP 401": "the API key is missing or wrong: set POLICY_SPLIT_JUDGE_API_KEY",
    "HTTP 403": "the API key may not use this model or endpoint",
    "HTTP 404": "no such endpoint or model: check the judge's base URL (it must end before /chat/completions, e.g. "
    "https://api.openai.com/v1) and model name",
}
UNPARSEABLE = "unparseable reply"
SKIPPED = "skipped"


def failure_kind(result: JudgeResult) -> str | None:
    """The class of a story's failure (`JudgeResult.error_kind`, or `"unparseable reply"`); `None` if it was scored."""
    if result.error is not None:
        return result.error_kind or "error"
    return UNPARSEABLE if result.scores is None else None


class JudgeCircuitBreaker:
    """
    Stops judging when the judge keeps failing the same way, so that a wrong key or a broken endpoint costs one call
    (or a few), not one per story. Thread-safe: [`judge_stories`] may call the judge from several threads.

    Pass the same breaker to several [`judge_stories`] calls (e.g. one per mode) to stop them all.

    Args:
        max_consecutive_failures (`int`, *optional*, defaults to `JUDGE_MAX_CONSECUTIVE_FAILURES` (3)):
            Stories in a row whose failure is of the same kind (see [`failure_kind`]) after which no more calls are
            made; a scored story resets the count. Failures of [`STOP_AT_ONCE`] (HTTP 401, 403, 404) stop at once.

    Attributes:
        reason (`str` or `None`):
            Why judging was stopped (never containing credentials); `None` while it goes on.
    """

    def __init__(self, max_consecutive_failures: int = JUDGE_MAX_CONSECUTIVE_FAILURES):
        if (
            isinstance(max_consecutive_failures, bool)
            or not isinstance(max_consecutive_failures, int)
            or (max_consecutive_failures < 1)
        ):
            raise ValueError(f"max_consecutive_failures must be an integer >= 1, got {max_consecutive_failures!r}.")
        self.max_consecutive_failures = max_consecutive_failures
        self.reason: str | None = None
        self._last_kind: str | None = None
        self._count = 0
        self._lock = threading.Lock()

    @property
    def stopped(self) -> bool:
        """Whether judging was stopped."""
        return self.reason is not None

    def record(self, result: JudgeResult) -> None:
        """Count one story's outcome, and stop when it is the failure that makes further calls pointless."""
        kind = failure_kind(result)
        with self._lock:
            if kind is None:
                self._last_kind, self._count = None, 0
                return
            if kind == SKIPPED or self.reason is not None:
                return
            self._count = self._count + 1 if kind == self._last_kind else 1
            self._last_kind = kind
            detail = result.error if result.error is not None else f"last reply {result.raw[:200]!r}"
            if kind in STOP_AT_ONCE:
                self.reason = f"{kind} ({STOP_AT_ONCE[kind]}): {detail}"
            elif self._count >= self.max_consecutive_failures:
                self.reason = f"{self._count} stories in a row failed the same way ({kind}): {detail}"
            if self.reason is not None:
                logger.warning("Judge stopped, no more calls: %s", self.reason)


# ------------------------------------------------------------------------------------------------------ aggregation


def judge_stories(
    judge: Judge,
    items: Sequence[tuple[str, str]],
    progress: bool = True,
    num_workers: int = 1,
    return_results: bool = False,
    breaker: JudgeCircuitBreaker | None = None,
) -> dict[str, Any]:
    """
    Score stories with a judge and average the rubric scores, scaled to 0-100 as in Table 2 of the paper.

    Only parsed replies are averaged: unparseable replies and failed calls are counted in `n_unparseable` and
    `n_errors`, never scored 0. A judge that keeps failing the same way is stopped (see [`JudgeCircuitBreaker`]): the
    stories after that are not sent, and counted in `n_skipped`.

    Args:
        judge ([`Judge`]):
            E.g. an [`OpenAIJudge`] or a [`TransformersJudge`].
        items (`Sequence[tuple[str, str]]`):
            `(prompt, story)` pairs (the paper: 13 prompts x 8 stories).
        progress (`bool`, *optional*, defaults to `True`):
            Show a tqdm progress bar.
        num_workers (`int`, *optional*, defaults to `1`):
            Concurrent judge calls (threads): useful for an API judge, keep 1 for a local model.
        return_results (`bool`, *optional*, defaults to `False`):
            Also return every [`JudgeResult`] (as a dict) under `"results"`, in the order of `items`.
        breaker ([`JudgeCircuitBreaker`], *optional*):
            Shared with other calls to stop them all; a fresh one per call by default.

    Returns:
        `dict`: One key per rubric of [`RUBRICS`] with its mean score x10 (0-100), `"overall"` (mean of the five),
        `None` for all of them when no reply could be parsed; the counts `"n_items"`, `"n_scored"`,
        `"n_unparseable"` (the judge replied, but not in a readable format), `"n_errors"` (the call failed) and
        `"n_skipped"` (not sent: the judge had been stopped); and `"stopped"`: why the judge was stopped, or `None`.
    """
    from tqdm.auto import tqdm

    items = list(items)
    breaker = breaker if breaker is not None else JudgeCircuitBreaker()
    with tqdm(total=len(items), desc="Judging stories", unit="story", disable=not progress) as bar:

        def score_one(item: tuple[str, str]) -> JudgeResult:
            if breaker.stopped:
                result = JudgeResult(scores=None, raw="", error=f"not sent: {breaker.reason}", error_kind=SKIPPED)
            else:
                result = judge.score(*item)
                breaker.record(result)
            bar.update(1)
            return result

        if num_workers > 1:
            with ThreadPoolExecutor(max_workers=num_workers) as pool:
                results = list(pool.map(score_one, items))
        else:
            results = [score_one(item) for item in items]

    scored = [result.scores for result in results if result.error is None and result.scores is not None]
    n_skipped = sum(result.error_kind == SKIPPED for result in results)
    n_errors = sum(result.error is not None for result in results) - n_skipped
    summary: dict[str, Any] = {}
    for key in RUBRICS:
        summary[key] = SCORE_SCALE * sum(scores[key] for scores in scored) / len(scored) if scored else None
    summary["overall"] = sum(summary[key] for key in RUBRICS) / len(RUBRICS) if scored else None
    summary["n_items"] = len(results)
    summary["n_scored"] = len(scored)
    summary["n_unparseable"] = len(results) - len(scored) - n_errors - n_skipped
    summary["n_errors"] = n_errors
    summary["n_skipped"] = n_skipped
    summary["stopped"] = breaker.reason
    if len(scored) < len(results):
        logger.warning(
            "Judge: %d of %d stories not scored (%d unparseable replies, %d failed calls, %d not sent).",
            len(results) - len(scored),
            len(results),
            summary["n_unparseable"],
            n_errors,
            n_skipped,
        )
    if return_results:
        summary["results"] = [asdict(result) for result in results]
    return summary
