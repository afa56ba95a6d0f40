"""Answer extraction from instruct models' sentences, and the containment metric (hand-written cases)."""

import pytest

from attnflow.eval.answers import answer_scores, contains, extract_answer, first_sentence
from attnflow.eval.metrics import exact_match

LALELI = "Are the Laleli Mosque and Esma Sultan Mansion located in the same neighborhood?"
NATIONALITY = "Were Scott Derrickson and Ed Wood of the same nationality?"
CASES = [
    # (generated text, question, extracted answer)
    ("No, the Laleli Mosque and Esma Sultan Mansion are not located in", LALELI, "no"),
    ("Yes, both are American.", NATIONALITY, "yes"),
    ("yes", NATIONALITY, "yes"),
    ("No.", None, "no"),
    ("Yes! Both were American filmmakers.", None, "yes"),
    ("No Doubt", "Which band released Tragic Kingdom?", "No Doubt"),  # a name, not a no
    ("No Doubt released it.", None, "No Doubt released it"),
    ("The answer is: 9,984", None, "9,984"),
    ("The answer is 9.5 million.", None, "9.5 million"),
    ("Answer: 3,677 seated", None, "3,677 seated"),
    ("A: 1999", None, "1999"),
    ("Sure! The answer is St. Louis, Missouri. It lies on the Mississippi.", None, "St. Louis, Missouri"),
    ("Based on the context, the correct answer is Greenwich Village, NYC.", None, "Greenwich Village, NYC"),
    ("March 21, 1873. She died in 1899.", None, "March 21, 1873"),
    ("He served from 1969 until 1974.\nThe next president was Ford.", None, "He served from 1969 until 1974"),
    ("Robert Erskine Childers DSC was from England.", None, "Robert Erskine Childers DSC was from England"),
    ("Roger O. Egeberg served under Nixon. He was a doctor.", None, "Roger O. Egeberg served under Nixon"),
    ("The U.S. Army. It was founded in 1775.", None, "The U.S. Army"),
    ("**Terry Richardson**", "Who is older, Annie Morton or Terry Richardson?", "Terry Richardson"),
    ('"Kansas Song"', None, "Kansas Song"),
    ("The fight song of the university is Kansas Song.", "What is the fight song of the university?", "Kansas Song"),
    ("Paris is the capital of France.", "What is the capital of France?", "Paris is the capital of France"),
    ("Answer:\nAnimorphs", None, "Animorphs"),
    ("\n\n  Sonic the Hedgehog\n", None, "Sonic the Hedgehog"),
    ("Certainly. The final answer is: Chief of Protocol.", None, "Chief of Protocol"),
    ("The director is based in Greenwich Village, N.Y.", None, "The director is based in Greenwich Village, N.Y."),
    ("Is it Paris? I think so.", None, "Is it Paris"),
    ("Great Eastern Conventions", None, "Great Eastern Conventions"),  # not the pleasantry "Great!"
    ("Okay, Eenasul Fateh", None, "Eenasul Fateh"),
    ("Answer the question", None, "Answer the question"),  # no label: "Answer" without is/: stays
    ("", None, ""),
    ("   \n \n", LALELI, ""),
]


@pytest.mark.parametrize("generated, question, expected", CASES, ids=[c[0][:30] or "empty" for c in CASES])
def test_extract_answer(generated, question, expected):
    assert extract_answer(generated, question) == expected


def test_there_are_at_least_20_cases():
    assert len(CASES) >= 20 and sum(e in {"yes", "no"} for _, _, e in CASES) >= 4


@pytest.mark.parametrize(
    "text, expected",
    [
        ("It costs 9.5 dollars. Cheap.", "It costs 9.5 dollars."),
        ("Mr. Smith went to Washington. Then home.", "Mr. Smith went to Washington."),
        ("J. K. Rowling wrote it! Really.", "J. K. Rowling wrote it!"),
        ("approx. five people came. Then more.", "approx. five people came."),
        ("one line without an end", "one line without an end"),
    ],
)
def test_first_sentence(text, expected):
    assert first_sentence(text) == expected


def test_contains_is_whole_word_containment_of_normalised_strings():
    assert contains("No, the Laleli Mosque and Esma Sultan Mansion are not located in", "no") == 1.0
    assert contains("I do not know", "no") == 0.0  # "no" inside "not"/"know" does not count
    assert contains("It seats 3,677 seated fans", "3,677 seated") == 1.0
    assert contains("The North Atlantic Conference.", "the North Atlantic Conference") == 1.0  # articles dropped
    assert contains("Pedro Rodriguez", "Pedro Rodríguez") == 0.0  # no accent folding (SQuAD normalisation has none)
    assert contains("anything", "") == 0.0 and contains("", "yes") == 0.0


def test_answer_scores_before_and_after_extraction():
    s = answer_scores("The answer is: 9,984\nMore text.", "9,984")
    assert s["prediction"] == "9,984" and s["em"] == 1.0 and s["f1"] == 1.0 and s["contains"] == 1.0
    assert s["em_raw"] == 0.0 and 0 < s["f1_raw"] < 1 and s["contains_raw"] == 1.0
    s = answer_scores("No, the Laleli Mosque and Esma Sultan Mansion are not located in", "no", LALELI)
    assert (s["em"], s["em_raw"]) == (1.0, 0.0)
    assert exact_match(extract_answer("Yes, both are American.", NATIONALITY), "yes") == 1.0
