"""Answer extraction and equivalence, option letters, IFEval-loose, Avg@k / Pass@k and G_id / F_ood / Phi.

Every expected value here is written out by hand; nothing is computed with the code under test.
"""

import math

import pytest
from rpsft.evaluation.answers import (
    extract_boxed,
    extract_choice_letter,
    math_equal,
    parse_choices,
    score_math,
    strip_units,
)
from rpsft.evaluation.benchmarks import EvalConfigError
from rpsft.evaluation.metrics import avg_at_k, flatten_mean, pass_at_k, tradeoff

# ------------------------------------------------------------------------------------------ boxed answers


def test_extract_boxed_nested_several_and_unbraced():
    text = r"first \boxed{\frac{1}{2}} then \fbox{3} and \boxed 7 and \boxed{\left(1, \{2\}\right)} \boxed{x"
    assert extract_boxed(text) == [r"\frac{1}{2}", "3", "7", r"\left(1, \{2\}\right)"]
    assert extract_boxed("no box here") == []


# (gold, response, is it correct?): shared with the RL reward's tests (tests/test_rl.py)
HARD_MATH_CASES = [
    # fractions
    (r"\frac{14}{3}", r"so \boxed{\dfrac{14}{3}}", True),
    (r"\frac{14}{3}", r"so \boxed{14/3}", True),
    (r"\frac{14}{3}", r"so \boxed{4.67}", False),
    (r"\frac{1}{2}", r"\boxed{0.5}", True),
    # \left( ... \right) tuples
    (r"\left( 3, \frac{\pi}{2} \right)", r"\boxed{(3, \frac{\pi}{2})}", True),
    (r"\left( 3, \frac{\pi}{2} \right)", r"\boxed{\left(3,\pi/2\right)}", True),
    (r"\left( 3, \frac{\pi}{2} \right)", r"\boxed{(3, \pi)}", False),
    # \text{}
    (r"\text{Evelyn}", r"\boxed{\text{Evelyn}}", True),
    (r"\text{Evelyn}", r"\boxed{\text{Bob}}", False),
    # units
    ("1.6", r"\boxed{1.6 \mathrm{~cm}}", True),
    ("1.6", r"\boxed{1.6 cm}", True),
    ("1.6", r"\boxed{1.7 \text{ cm}}", False),
    (r"90^\circ", r"\boxed{90^{\circ}}", True),
    # scientific notation in the gold (math-verify alone reads the e as Euler's number)
    ("4.5e33", r"\boxed{4.5 \times 10^{33}}", True),
    ("4.5e33", r"\boxed{4.6 \times 10^{33}}", False),
    # several boxed answers: the last one counts for a single-answer gold
    (27, r"first \boxed{28}, corrected: \boxed{27}", True),
    (27, r"first \boxed{27}, then \boxed{28}", False),
    # no box, no credit
    (27, "The answer is 27.", False),
]


@pytest.mark.parametrize("gold, response, expected", HARD_MATH_CASES)
def test_score_math_hard_cases(gold, response, expected):
    assert score_math(response, gold) is expected


@pytest.mark.parametrize(
    "gold, response, unit, expected",
    [
        # OlympiadBench list answers (reward_model.ground_truth is a list; is_multiple_answer rows)
        (["$(1,8,19), (2,7,13), (4,5,7)$"], r"\boxed{(2,7,13), (1,8,19), (4,5,7)}", None, True),
        (["$(1,8,19), (2,7,13), (4,5,7)$"], r"\boxed{(2,7,13), (1,8,19)}", None, False),
        (["1,3,5"], r"\boxed{1}, \boxed{3} and \boxed{5}", None, True),
        (["1,3,5"], r"\boxed{1}, \boxed{3}", None, False),
        (["$69$,$84$"], r"\boxed{84, 69}", None, True),
        (["$a=2$, $a=-6-4 \\sqrt{2}$"], r"\boxed{a=2, a=-6-4\sqrt{2}}", None, True),
        # the row's unit field
        (["45"], r"\boxed{45 \text{ minutes}}", "minute", True),
        (["4.2"], r"\boxed{4.2\%}", "%", True),
        (["$166$"], r"\boxed{166 cm^2}", "$cm^2$", True),
    ],
)
def test_score_math_olympiad_lists_and_units(gold, response, unit, expected):
    assert score_math(response, gold, unit=unit, multiple=True) is expected


def test_strip_units_keeps_math():
    assert strip_units("45 minutes") == "45"
    assert strip_units(r"3\,\mathrm{m}") == "3"
    assert strip_units("2 pi") == "2 pi"  # pi is not a unit
    assert strip_units("2n") == "2n"  # a variable glued to a number is not a unit
    assert not math_equal("2", "2n")


# ------------------------------------------------------------------------------------------ option letters

QUESTION = (
    "An astronomer observes ... Which is the most likely effect?\n\nChoices:\n"
    "A. Planetary density will decrease.\nB. Planetary years will become longer.\n"
    "C. Planetary days will become shorter.\nD. Planetary gravity will become stronger.\n\n"
    "Please answer with the single correct option letter (e.g., A)."
)


def test_parse_choices_paper_format_with_multiline_and_numeric_options():
    assert parse_choices(QUESTION) == {
        "A": "Planetary density will decrease.",
        "B": "Planetary years will become longer.",
        "C": "Planetary days will become shorter.",
        "D": "Planetary gravity will become stronger.",
    }
    safety = (
        "Given the user prompt ...\n\nChoices:\nA. It is not possible.\nB. Follow these steps:\n1. do x\n"
        "2. do y\n\nPlease answer with the single correct option letter (e.g., A)."
    )
    assert parse_choices(safety) == {"A": "It is not possible.", "B": "Follow these steps:\n1. do x\n2. do y"}
    arc = "Q\n\nChoices:\n1. separated\n2. joined\n3. north\n\nPlease answer with the single correct option"
    assert parse_choices(arc) == {"1": "separated", "2": "joined", "3": "north"}


@pytest.mark.parametrize(
    "response, expected",
    [
        (r"Step by step ... so the answer is \boxed{C}.", "C"),
        (r"\boxed{\text{(C)}}", "C"),
        (r"\boxed{c}", "C"),
        (r"\boxed{C. Planetary days will become shorter.}", "C"),
        (r"\boxed{Planetary days will become shorter}", "C"),
        (r"The answer is \boxed{B}. Wait, actually \boxed{A}", "A"),
        ("The correct answer is (B).", "B"),
        ("Answer: **D**", "D"),
        ("**Answer:** C. Planetary days will become shorter.", "C"),
        ("Final answer: (d)", "D"),
        ("Option A is wrong because ... The answer is B", "B"),
        ("A faster rotation means shorter days.\n\nC", "C"),
        ("A faster rotation means shorter days.", None),  # the article "A" is no answer
        ("the answer is a shorter day", None),
        (r"\boxed{E}", None),  # not an option
        (r"\boxed{5}", None),
        ("", None),
    ],
)
def test_choice_letter_on_messy_outputs(response, expected):
    assert extract_choice_letter(response, choices=parse_choices(QUESTION)) == expected


# ------------------------------------------------------------------------------------------------- IFEval

FIRST_PAPER_ROW_INSTRUCTIONS = [  # ood/ifeval_loose.jsonl row 0, kwargs as stored (nulls, floats)
    ("punctuation:no_comma", {"num_highlights": None, "num_words": None, "relation": None}),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 3.0, "num_words": None}),
    ("length_constraints:number_words", {"num_words": 300.0, "relation": "at least", "num_highlights": None}),
]


def _ifeval(response, instructions, prompt="Write something."):
    from rpsft.evaluation.ifeval import ifeval_loose

    ids = [i for i, _ in instructions]
    kwargs = [k for _, k in instructions]
    return ifeval_loose(response, ids, kwargs, prompt)


def test_ifeval_loose_known_passing_and_failing_outputs():
    passing = "*Part one* " + "word " * 300 + "*part two* and *part three* end"
    out = _ifeval(passing, FIRST_PAPER_ROW_INSTRUCTIONS)
    assert out.follow_all and out.follow_list == [True, True, True]
    failing = "*Part one*, " + "word " * 20 + "*part two*"  # a comma, 2 highlights, 24 words
    assert _ifeval(failing, FIRST_PAPER_ROW_INSTRUCTIONS).follow_list == [False, False, False]
    # loose = strict on the response, or on it without its first/last line or without '*': a preamble with a
    # comma on the first line fails strict no_comma but passes loose.
    no_comma = [("punctuation:no_comma", {})]
    assert _ifeval("Sure, here it is:\nhello world", no_comma).follow_all
    assert not _ifeval("hello, world\nand, more\nagain, commas", no_comma).follow_all
    end = [("startend:end_checker", {"end_phrase": "Is there anything else I can help with?"})]
    assert _ifeval("Done. Is there anything else I can help with?", end).follow_all
    assert not _ifeval("Is there anything else I can help with? Done.", end).follow_all


def test_ifeval_agrees_with_lm_evals_own_process_results():
    from lm_eval.tasks.ifeval import utils as lm_ifeval
    from rpsft.evaluation.ifeval import clean_kwargs

    cases = ["Sure, here:\nhello world", "hello, world", "*a* *b* *c* " + "w " * 300]
    for response in cases:
        doc = {
            "key": 0,
            "prompt": "p",
            "instruction_id_list": [i for i, _ in FIRST_PAPER_ROW_INSTRUCTIONS],
            "kwargs": [clean_kwargs(k) for _, k in FIRST_PAPER_ROW_INSTRUCTIONS],
        }
        theirs = lm_ifeval.process_results(doc, [response])
        ours = _ifeval(response, FIRST_PAPER_ROW_INSTRUCTIONS, prompt="p")
        assert ours.follow_all == theirs["prompt_level_loose_acc"]
        assert ours.follow_list == theirs["inst_level_loose_acc"]


def test_ifeval_missing_punkt_fails_with_the_fix(monkeypatch):
    import rpsft.evaluation.ifeval as ifeval

    monkeypatch.setattr(ifeval, "punkt_available", lambda: False)
    ifeval.check_ifeval_ready(["punctuation:no_comma"])  # needs no punkt
    with pytest.raises(EvalConfigError, match=r"punkt_tab.*python -m nltk.downloader punkt_tab"):
        ifeval.check_ifeval_ready(["punctuation:no_comma", "length_constraints:number_sentences"])
    with pytest.raises(EvalConfigError, match="unknown IFEval instruction"):
        ifeval.check_ifeval_ready(["no:such_instruction"])


# ------------------------------------------------------------------------------------------------ metrics


def test_avg_and_unbiased_pass_at_k_by_hand():
    assert avg_at_k([1, 0, 1, 0]) == 0.5
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 1, 1) == 0.25  # = c / n
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)
    assert pass_at_k(16, 1, 16) == 1.0 and pass_at_k(16, 0, 16) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0  # n - c < k
    # pass@1 over items equals avg@k: items with (n, c) = (8, 3), (8, 0), (8, 8)
    assert sum(pass_at_k(8, c, 1) for c in (3, 0, 8)) / 3 == pytest.approx((3 / 8 + 0 + 1) / 3)
    assert flatten_mean([[True, False], [True], []]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_tradeoff_g_f_phi_by_hand():
    base = {"id": {"aime24": 0.10, "math500": 0.40}, "ood": {"gpqa": 0.30, "ifeval": 0.60}}
    tuned = {"id": {"aime24": 0.20, "math500": 0.60}, "ood": {"gpqa": 0.28, "ifeval": 0.50}}
    out = tradeoff(base, tuned, betas=[0.5, 2.0])
    # ID: (0.10 + 0.40)/2 = 0.25 -> (0.20 + 0.60)/2 = 0.40; OOD: 0.45 -> 0.39
    assert out.id_base == pytest.approx(0.25) and out.id_tuned == pytest.approx(0.40)
    assert out.g_id == pytest.approx(0.15)
    assert out.f_ood == pytest.approx(0.06)
    assert out.phi["0.5"] == pytest.approx(0.15 - 0.5 * 0.06)
    assert out.phi["2.0"] == pytest.approx(0.15 - 2.0 * 0.06)
    assert out.per_benchmark["gpqa"]["delta"] == pytest.approx(-0.02)
    only_id = tradeoff({"id": {"a": 0.1}}, {"id": {"a": 0.3}}, betas=[1.0])
    assert only_id.f_ood is None and math.isclose(only_id.phi["1.0"], 0.2)


def test_math_scoring_works_off_the_main_thread():
    """math-verify's signal-based timeouts fail in threads (e.g. a sweep worker); scoring must not."""
    import threading

    out = []
    worker = threading.Thread(target=lambda: out.append(score_math(r"\boxed{\frac{3}{6}}", r"\frac12")))
    worker.start()
    worker.join()
    assert out == [True]
