import json
import os
import random

import pytest

from policy_split_trl.rewards import (
    REWARD_FUNCS,
    arithmetic_reward,
    as_gold_latex,
    extract_boxed,
    get_reward_func,
    math_accuracy_reward,
    multiple_choice_reward,
    normalize_latex_shorthand,
    reasoning_math_accuracy_reward,
)

MATH500 = os.path.join(os.path.dirname(__file__), "data", "math500.jsonl")


def msg(text):
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def math500():
    with open(MATH500) as f:
        return [json.loads(line) for line in f]


def test_math500_gold_solutions_grade_correct(math500):
    rewards = math_accuracy_reward([msg(r["solution"]) for r in math500], [r["answer"] for r in math500])
    correct = sum(r == 1.0 for r in rewards)
    assert len(math500) == 500
    assert correct / 500 >= 0.99, f"{correct}/500"


def test_math500_solutions_against_another_problems_answer_grade_wrong(math500):
    # Pair each solution with the answer of another problem whose answer differs (a derangement in a seeded order).
    order = list(range(500))
    random.Random(0).shuffle(order)
    rewards, pairs = [], []
    for pos, i in enumerate(order):
        step = 1
        while math500[order[(pos + step) % 500]]["answer"].replace(" ", "") == math500[i]["answer"].replace(" ", ""):
            step += 1
        pairs.append((i, order[(pos + step) % 500]))
    rewards = math_accuracy_reward(
        [msg(math500[i]["solution"]) for i, _ in pairs], [math500[j]["answer"] for _, j in pairs]
    )
    wrong = sum(r == 0.0 for r in rewards)
    assert wrong / 500 >= 0.99, f"{wrong}/500"


def test_latex_shorthand_and_gold_wrapping():
    assert normalize_latex_shorthand(r"\frac43 + \dfrac 59 + \frac9{19} + \frac{270}7 + \sqrt2") == (
        r"\frac{4}{3} + \dfrac{5}{9} + \frac{9}{19} + \frac{270}{7} + \sqrt{2}"
    )
    assert normalize_latex_shorthand(r"\frac{12}{35} \sqrt{3}") == r"\frac{12}{35} \sqrt{3}"
    assert as_gold_latex(r"\frac{14}{3}") == r"$\frac{14}{3}$"
    assert as_gold_latex(r"\$18.90") == r"$\$18.90$"  # an escaped dollar is a price, not a math delimiter
    assert as_gold_latex(r"$x$") == "$x$"
    assert as_gold_latex(r"the answer is \boxed{3}") == r"the answer is \boxed{3}"


def test_math_reward_on_plain_and_conversational_completions():
    assert math_accuracy_reward([r"so \boxed{\frac43}", msg(r"\boxed{1.5}")], [r"\frac{4}{3}", "3/2"]) == [1.0, 1.0]
    assert math_accuracy_reward([r"\boxed{5}"], ["6"]) == [0.0]


def test_reasoning_reward_grades_only_after_think():
    completions = [
        msg(r"<think>maybe \boxed{3}</think> The answer is \boxed{4}."),
        msg(r"<think>maybe \boxed{4}</think> The answer is \boxed{3}."),
        msg(r"<think>still thinking \boxed{4}"),  # never closes its reasoning
    ]
    assert reasoning_math_accuracy_reward(completions, ["4", "4", "4"]) == [1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "text, gold, expected",
    [
        (r"The answer is \boxed{C}.", "C", 1.0),
        (r"\boxed{(C)}", "C", 1.0),
        (r"\boxed{\text{C}}", "C", 1.0),
        (r"\boxed{ C. }", "(C)", 1.0),
        (r"\boxed{C}", "B", 0.0),
        ("The answer is C.", "C", 0.0),  # no box
        (r"First \boxed{A}, on reflection \boxed{C}", "C", 1.0),  # the last box is the answer
        (r"\boxed{C} but actually \boxed{A}", "C", 0.0),
        (r"\boxed{c}", "C", 0.0),  # lowercase: the prompt asks for the uppercase letter
        (r"\boxed{CD}", "C", 0.0),  # several letters
        (r"\boxed{Paris}", "C", 0.0),  # option text instead of its letter
        (r"\boxed{C", "C", 0.0),  # unterminated box
    ],
)
def test_multiple_choice_reward(text, gold, expected):
    assert multiple_choice_reward([msg(text)], [gold]) == [expected]
    assert multiple_choice_reward([text], [gold]) == [expected]


def test_extract_boxed_balances_braces():
    assert extract_boxed(r"\boxed{\frac{1}{2}} and \boxed {x^{2}}") == [r"\frac{1}{2}", "x^{2}"]
    assert extract_boxed(r"\boxed{open") == []


@pytest.mark.parametrize(
    "text, gold, expected",
    [
        ("68", "68", 1.0),
        ("23 + 45 = 68", "68", 1.0),
        ("The answer is 68.", "68", 1.0),
        ("-7", "-7", 1.0),
        (r"\boxed{68} (I used 3 steps)", "68", 1.0),  # a boxed number wins over later numbers
        ("1,068", "1068", 1.0),
        ("68 or maybe 67", "68", 0.0),
        ("sixty-eight", "68", 0.0),
    ],
)
def test_arithmetic_reward(text, gold, expected):
    assert arithmetic_reward([msg(text)], [gold]) == [expected]


def test_get_reward_func_by_name_and_dotted_path():
    assert get_reward_func("accuracy") is math_accuracy_reward
    assert set(REWARD_FUNCS) >= {"accuracy", "reasoning_accuracy", "multiple_choice", "arithmetic", "think_format"}
    assert get_reward_func("policy_split_trl.rewards.arithmetic_reward") is arithmetic_reward
    assert get_reward_func("policy_split_trl.rewards:multiple_choice_reward") is multiple_choice_reward
    with pytest.raises(ValueError, match="Unknown reward function 'nope'"):
        get_reward_func("nope")
    with pytest.raises(ValueError, match="Cannot import reward function"):
        get_reward_func("policy_split_trl.rewards.does_not_exist")
    with pytest.raises(TypeError, match="non-callable"):
        get_reward_func("policy_split_trl.rewards.REWARD_FUNCS")
