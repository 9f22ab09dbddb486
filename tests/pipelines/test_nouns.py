"""The noun phrases grounding looks for: the built-in rules on realistic answers, and the spaCy option's refusal."""

from __future__ import annotations

import importlib.util

import pytest

from pipelines.apps.nouns import noun_phrases, singular
from pipelines.errors import InputError

ANSWERS = [
    ("A brown dog is running on the beach next to a red ball.", ["brown dog", "beach", "red ball"]),
    ("The image shows two cats sleeping on a sofa.", ["cats", "sofa"]),
    ("In this picture, a man in a blue shirt is holding an umbrella.", ["man", "blue shirt", "umbrella"]),
    ("It is a red circle on a grey background.", ["red circle"]),
    (
        "There are three apples and a banana on the wooden table; the apples look fresh.",
        ["apples", "banana", "wooden table"],
    ),
    (
        "A woman wearing sunglasses rides a bicycle past a tall building.",
        ["woman", "sunglasses", "bicycle", "tall building"],
    ),
    ("The picture depicts a cat and a dog. The dog is bigger than the cat.", ["cat", "dog"]),
    (
        "The larger box is beside the smallest ball and the happier father.",
        ["larger box", "smallest ball", "happier father"],
    ),
    (
        "Two children are playing football in the park with their father's dog.",
        ["children", "football", "park", "father", "dog"],
    ),
    ("The sky is blue and the grass is green.", ["sky", "grass"]),
    (
        "A plate of pasta with tomato sauce and fresh basil leaves.",
        ["plate", "pasta", "tomato sauce", "fresh basil leaves"],
    ),
    (
        "It looks like a photo of a city street at night, with cars and traffic lights.",
        ["city street", "cars", "traffic lights"],
    ),
    ("Yes, there is a dog. The dogs are playing with a box and two boxes.", ["dog", "box"]),
    ("a red circle", ["red circle"]),
    ("No.", []),
    ("It is this one.", []),
    ("", []),
]


@pytest.mark.parametrize(("answer", "phrases"), ANSWERS)
def test_rules_find_the_things_an_answer_names(answer: str, phrases: list[str]) -> None:
    assert noun_phrases(answer) == phrases


def test_plurals_fold_to_one_form() -> None:
    words = ["boxes", "berries", "glass", "bus", "children", "dogs", "leaves", "dishes", "cat"]
    assert [singular(w) for w in words] == ["box", "berry", "glass", "bus", "child", "dog", "leaf", "dish", "cat"]


@pytest.mark.skipif(importlib.util.find_spec("spacy") is not None, reason="spaCy is installed here")
def test_a_spacy_parser_without_spacy_is_refused() -> None:
    with pytest.raises(InputError, match=r"model\.noun_parser 'en_core_web_sm': spaCy is not installed"):
        noun_phrases("A dog.", "en_core_web_sm")
