"""Creative writing evaluation of the paper (Section 4.3, Table 2, Appendix C.3): story prompts and diversity metrics.

The paper samples k = 8 stories for each of the 13 prompts below and scores each group of k stories with

- Div-N-Gram (Eq. 11): the mean over the k stories of `#unique 2-grams / #2-grams` of each story;
- Div-BLEU (Eq. 12): `1 - mean_i BLEU-4(o_i, the other k - 1 stories)` (self-BLEU diversity).

Both are also available as offline [`evaluate`](https://huggingface.co/docs/evaluate) metrics:
`evaluate.load(metric_path("div_ngram"))` and `evaluate.load(metric_path("div_bleu"))`.

The metrics score the text they are given: strip a reasoning model's thinking (e.g. everything up to `</think>`)
before passing its stories, unless the thinking is meant to be scored too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

# Appendix C.3 ("Creative Writing Tasks"), verbatim. The paper's PDF only wraps lines; we join them and undo the two
# line-break hyphenations ("perspec-tive", "inde-pendently"). The paper gives no instruction around these prompts:
# each is sent as the user message as is.
CREATIVE_WRITING_PROMPTS: list[str] = [
    "Write a story about a mysterious door that appears in an unexpected place.",
    "Write a story about an alien civilization’s first contact with Earth from their perspective.",
    "Write a story about a world where time suddenly starts moving backwards.",
    (
        "Write a story about a library where the books are blank until someone touches them, revealing their own "
        "life story."
    ),
    (
        "Write a story about a person who discovers that their shadow has started acting independently and even "
        "leaving without them."
    ),
    "Write a story about a futuristic city built entirely inside a giant, dormant biological organism.",
    (
        "Write a story about a world where people are born with a timer on their wrist showing exactly how much time "
        "they have left to live."
    ),
    (
        "Write a story about a lighthouse keeper who realizes the light isn’t for ships, but to keep something in "
        "the ocean from coming ashore."
    ),
    # The OCR reads an opening straight quote here ('memory wiper’); the paper's typesetting pairs curly quotes.
    (
        "Write a story about a professional ‘memory wiper’ who accidentally rediscovers a memory of their own that "
        "they weren’t supposed to have."
    ),
    "Write a story about a small town where, once a year, all the statues come to life for exactly one hour.",
    (
        "Write a story about a group of children who find an old radio that broadcasts news from fifty years in the "
        "future."
    ),
    (
        "Write a story about a world where color is a luxury that people have to buy, and the poor live in a "
        "black-and-white reality."
    ),
    (
        "Write a story about an astronaut who lands on a planet that looks exactly like Earth, but they are the only "
        "human there."
    ),
]

# Samples per prompt in the paper (Section 4.3: "8 sampled runs"; Eq. 11 and 12 sum over i = 1..8).
NUM_SAMPLES_PER_PROMPT = 8

_METRIC_MODULES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metric_modules")
METRIC_NAMES = ("div_ngram", "div_bleu")


def _tokenize(text: str) -> list[str]:
    # Distinct-n (Li et al., 2016) counts whitespace tokens; lowercasing keeps "The"/"the" from counting as two
    # different words. Punctuation stays attached to its word: no tokenizer choice is given in the paper.
    return text.lower().split()


def distinct_ngram_ratio(text: str, n: int = 2) -> float:
    """
    Ratio of distinct n-grams to all n-grams of one text (the per-story term of Eq. 11).

    The text is lowercased and split on whitespace; punctuation stays attached to its word.

    Args:
        text (`str`):
            The text to score.
        n (`int`, *optional*, defaults to `2`):
            N-gram order (the paper uses 2).

    Returns:
        `float`: `#unique n-grams / #n-grams`, in `[0, 1]`. A text with fewer than `n` tokens has no n-gram and
        scores `0.0` (it adds no diversity), so an empty or truncated story lowers the mean instead of being dropped.
    """
    if n < 1:
        raise ValueError(f"`n` must be a positive integer, got {n}.")
    tokens = _tokenize(text)
    ngrams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not ngrams:
        return 0.0
    return len(set(ngrams)) / len(ngrams)


def div_ngram(stories: Sequence[str], n: int = 2) -> float:
    """
    Div-N-Gram of a group of stories sampled for one prompt (Eq. 11): the mean of the per-story distinct n-gram ratios.

    Args:
        stories (`Sequence[str]`):
            The k stories sampled for one prompt (k = 8 in the paper).
        n (`int`, *optional*, defaults to `2`):
            N-gram order (the paper uses 2).

    Returns:
        `float`: The mean of [`distinct_ngram_ratio`] over the stories, in `[0, 1]` (the paper reports it x100).
    """
    stories = _check_stories(stories, min_count=1)
    return sum(distinct_ngram_ratio(story, n=n) for story in stories) / len(stories)


def mean_over_prompts(
    metric: Callable[..., float], predictions: Sequence[str] | Sequence[Sequence[str]], **kwargs: Any
) -> float:
    """
    A group metric ([`div_ngram`], [`div_bleu`]) on the k stories of one prompt, or its mean over several prompts'
    groups (one number per model, as in Table 2).

    Args:
        metric (`Callable`):
            A function of one group of stories.
        predictions (`Sequence[str]` or `Sequence[Sequence[str]]`):
            One group (strings) or several groups (lists of strings).
        **kwargs:
            Passed to `metric` (e.g. `n=` for Div-N-Gram).

    Returns:
        `float`: the metric of the group, or the mean over groups.
    """
    if not predictions:
        raise ValueError("`predictions` is empty: pass the k stories of a prompt, or a list of such groups.")
    if isinstance(predictions[0], str):
        return metric(predictions, **kwargs)
    return sum(metric(group, **kwargs) for group in predictions) / len(predictions)


def div_bleu(stories: Sequence[str]) -> float:
    """
    Div-BLEU (self-BLEU diversity) of a group of stories sampled for one prompt (Eq. 12).

    `1 - mean_i BLEU-4(o_i, references = the other k - 1 stories)`, where BLEU-4 is `sacrebleu.sentence_bleu` with
    its defaults (4-gram, `13a` tokenizer, case-sensitive, `exp` smoothing, effective order) divided by 100.

    Args:
        stories (`Sequence[str]`):
            The k >= 2 stories sampled for one prompt (k = 8 in the paper).

    Returns:
        `float`: The diversity in `[0, 1]` (the paper reports it x100): `0.0` when all stories are identical, `1.0`
        when no story shares a single word with another.
    """
    import sacrebleu

    stories = _check_stories(stories, min_count=2)
    total = 0.0
    for i, hypothesis in enumerate(stories):
        references = stories[:i] + stories[i + 1 :]
        # sacrebleu's float arithmetic can return 100.00000000000004 for a perfect match.
        total += min(sacrebleu.sentence_bleu(hypothesis, references).score / 100.0, 1.0)
    return 1.0 - total / len(stories)


def _check_stories(stories: Sequence[str], min_count: int) -> list[str]:
    # A bare string would silently be scored as a group of one-character "stories".
    if isinstance(stories, str):
        raise TypeError("`stories` must be a sequence of strings (the k stories of one prompt), not a single string.")
    stories = list(stories)
    if len(stories) < min_count:
        raise ValueError(f"Need at least {min_count} stories of the same prompt, got {len(stories)}.")
    for story in stories:
        if not isinstance(story, str):
            raise TypeError(f"Every story must be a string, got {type(story).__name__}.")
    return stories


def metric_path(name: str) -> str:
    """
    Folder of one of the package's [`evaluate`](https://huggingface.co/docs/evaluate) metric modules.

    Pass it to `evaluate.load`, which loads a local folder without the Hub (also with `HF_HUB_OFFLINE=1` /
    `HF_EVALUATE_OFFLINE=1`):

    ```python
    >>> import evaluate
    >>> div_bleu = evaluate.load(metric_path("div_bleu"))
    >>> div_bleu.compute(predictions=["a story", "another story"])  # one group: the k stories of one prompt
    ```

    Args:
        name (`str`):
            `"div_ngram"` or `"div_bleu"`.

    Returns:
        `str`: Absolute path of the metric's folder.
    """
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {name!r}; choose one of {list(METRIC_NAMES)}.")
    return os.path.join(_METRIC_MODULES_DIR, name)
