"""Creative writing prompts and diversity metrics (Eq. 11 and 12), and their offline `evaluate` modules."""

from __future__ import annotations

import os

import pytest
import sacrebleu

from policy_split_trl.eval.creative import (
    CREATIVE_WRITING_PROMPTS,
    METRIC_NAMES,
    distinct_ngram_ratio,
    div_bleu,
    div_ngram,
    metric_path,
)

CAT = "the cat sat on the mat"
CAT_IS = "the cat is on the mat"
REPEAT = "a b a b a"


# ------------------------------------------------------------------------------------------------------ Div-N-Gram


def test_distinct_ngram_ratio_by_hand():
    # "the cat sat on the mat": 5 bigrams (the cat, cat sat, sat on, on the, the mat), all distinct -> 5/5.
    assert distinct_ngram_ratio(CAT) == 1.0
    # "a b a b a": bigrams ab, ba, ab, ba -> 2 distinct of 4 -> 0.5.
    assert distinct_ngram_ratio(REPEAT) == 0.5
    # Lowercased: "the cat the cat" -> (the cat), (cat the), (the cat) -> 2 distinct of 3.
    assert distinct_ngram_ratio("The cat the Cat") == pytest.approx(2 / 3)
    # Whitespace of any kind separates tokens, punctuation stays attached: "a b." / "a b" are different bigrams.
    # "a b.\n\na  b" -> tokens a, b., a, b -> bigrams (a b.), (b. a), (a b) -> 3 distinct of 3.
    assert distinct_ngram_ratio("a b.\n\na  b") == 1.0


def test_distinct_ngram_ratio_other_orders():
    # n = 3: "a b c a b c" -> abc, bca, cab, abc -> 3 distinct of 4.
    assert distinct_ngram_ratio("a b c a b c", n=3) == 0.75
    # n = 1: "a a b" -> a, a, b -> 2 distinct of 3.
    assert distinct_ngram_ratio("a a b", n=1) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="positive"):
        distinct_ngram_ratio("a b", n=0)


def test_distinct_ngram_ratio_short_text_is_zero():
    # Fewer tokens than n: no n-gram at all, defined as 0.0 (no diversity), not skipped.
    assert distinct_ngram_ratio("") == 0.0
    assert distinct_ngram_ratio("   \n ") == 0.0
    assert distinct_ngram_ratio("hello") == 0.0
    assert distinct_ngram_ratio("hello world") == 1.0  # exactly one bigram
    assert distinct_ngram_ratio("a b", n=3) == 0.0


def test_div_ngram_is_mean_of_per_story_ratios():
    # (1.0 + 0.5) / 2 = 0.75: per story, then averaged (Eq. 11), NOT pooled over the stories.
    assert div_ngram([CAT, REPEAT]) == 0.75
    # Pooled it would be 7 distinct bigrams of 9 instead.
    assert div_ngram([CAT, REPEAT]) != pytest.approx(7 / 9)
    # A too-short story counts as 0: (0 + 0.5) / 2 = 0.25.
    assert div_ngram(["hello", REPEAT]) == 0.25
    # The same story 8 times: its own ratio.
    assert div_ngram([REPEAT] * 8) == 0.5
    assert div_ngram(("x y", "x x x"), n=1) == pytest.approx((1.0 + 1 / 3) / 2)  # any sequence; unigrams


def test_div_ngram_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 1"):
        div_ngram([])
    with pytest.raises(TypeError, match="single string"):
        div_ngram("a whole story")
    with pytest.raises(TypeError, match="string"):
        div_ngram(["a story", None])


# -------------------------------------------------------------------------------------------------------- Div-BLEU


def test_div_bleu_identical_stories_is_zero():
    # Every story has BLEU 100 against its copies: 1 - 1 = 0.
    assert div_bleu(["The door appeared in the middle of the desert, humming softly."] * 8) == pytest.approx(
        0.0, abs=1e-12
    )


def test_div_bleu_disjoint_stories_is_one():
    # No shared word: every unigram precision is 0, so BLEU is 0 and the diversity 1.
    stories = ["alpha beta gamma delta", "one two three four", "red green blue yellow"]
    assert div_bleu(stories) == 1.0


def test_div_bleu_by_hand():
    # BLEU-4(CAT, [CAT_IS]): unigrams the,cat,on,the,mat match 5/6; bigrams "the cat", "on the", "the mat" 3/5;
    # trigram "on the mat" 1/4; 4-grams 0/3, which exp smoothing turns into 1 / (2 * 3) = 1/6. Same lengths: BP = 1.
    # The other direction has the same counts, so both BLEUs are the geometric mean below.
    bleu = (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** (1 / 4)  # = 0.3799...
    assert sacrebleu.sentence_bleu(CAT, [CAT_IS]).score / 100 == pytest.approx(bleu)
    assert div_bleu([CAT, CAT_IS]) == pytest.approx(1 - bleu)
    assert div_bleu([CAT, CAT_IS]) == pytest.approx(0.62008, abs=1e-5)


def test_div_bleu_matches_sacrebleu_with_several_references():
    stories = [CAT, CAT_IS, "a dog sat on the mat", "the door opened onto the sea"]
    expected = 1 - sum(
        sacrebleu.sentence_bleu(story, stories[:i] + stories[i + 1 :]).score / 100 for i, story in enumerate(stories)
    ) / len(stories)
    assert div_bleu(stories) == pytest.approx(expected)
    assert 0.0 < div_bleu(stories) < 1.0


def test_div_bleu_needs_two_stories():
    with pytest.raises(ValueError, match="at least 2"):
        div_bleu([CAT])
    with pytest.raises(ValueError, match="at least 2"):
        div_bleu([])
    with pytest.raises(TypeError, match="single string"):
        div_bleu(CAT)


# --------------------------------------------------------------------------------------------------------- prompts


def test_creative_writing_prompts():
    assert len(CREATIVE_WRITING_PROMPTS) == 13
    assert len(set(CREATIVE_WRITING_PROMPTS)) == 13
    for prompt in CREATIVE_WRITING_PROMPTS:
        assert prompt.startswith("Write a story about ")
        assert prompt.endswith(".")
        assert prompt == prompt.strip() and "  " not in prompt and "\n" not in prompt
        assert "- " not in prompt  # no OCR line-break hyphen left behind
    assert CREATIVE_WRITING_PROMPTS[0] == "Write a story about a mysterious door that appears in an unexpected place."
    assert (
        "a lighthouse keeper who realizes the light isn’t for ships, but to keep something in the ocean from coming "
        "ashore." in CREATIVE_WRITING_PROMPTS[7]
    )
    assert "alien civilization’s first contact with Earth from their perspective." in CREATIVE_WRITING_PROMPTS[1]
    assert CREATIVE_WRITING_PROMPTS[-1].endswith("but they are the only human there.")


# -------------------------------------------------------------------------------------------- evaluate modules


@pytest.fixture
def offline_evaluate(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    import evaluate

    # `evaluate` reads the variable when first imported, which may have happened before this test.
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    return evaluate


def test_metric_path():
    for name in METRIC_NAMES:
        path = metric_path(name)
        assert os.path.isabs(path) and os.path.isdir(path)
        assert path.endswith(name)
        with open(f"{path}/{name}.py", encoding="utf-8") as f:
            assert "evaluate.Metric" in f.read()
    with pytest.raises(ValueError, match="Unknown metric"):
        metric_path("bleu")


def test_evaluate_modules_load_offline_and_match(offline_evaluate):
    evaluate = offline_evaluate
    group_a = [CAT, CAT_IS, REPEAT]
    group_b = ["alpha beta gamma", "the cat sat on the mat", "hello"]

    ngram = evaluate.load(metric_path("div_ngram"))
    bleu = evaluate.load(metric_path("div_bleu"))
    assert "Eq. 11" in ngram.description and "Eq. 12" in bleu.description
    assert ngram.citation and bleu.citation

    # One group per call: the k stories of one prompt.
    assert ngram.compute(predictions=group_a) == {"div_ngram": pytest.approx(div_ngram(group_a))}
    assert ngram.compute(predictions=group_a, n=3) == {"div_ngram": pytest.approx(div_ngram(group_a, n=3))}
    assert bleu.compute(predictions=group_a) == {"div_bleu": pytest.approx(div_bleu(group_a))}
    # Several groups: the mean of the per-group values.
    assert ngram.compute(predictions=[group_a, group_b]) == {
        "div_ngram": pytest.approx((div_ngram(group_a) + div_ngram(group_b)) / 2)
    }
    assert bleu.compute(predictions=[group_a, group_b]) == {
        "div_bleu": pytest.approx((div_bleu(group_a) + div_bleu(group_b)) / 2)
    }
    # The module path is also accepted as the script file itself.
    ngram_file = evaluate.load(f"{metric_path('div_ngram')}/div_ngram.py")
    assert ngram_file.compute(predictions=[CAT, REPEAT]) == {"div_ngram": 0.75}
    with pytest.raises(ValueError, match="at least 2"):
        bleu.compute(predictions=[CAT])
