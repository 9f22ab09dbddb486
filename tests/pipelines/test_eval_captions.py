"""Caption scores checked by hand (BLEU with its brevity penalty and smoothing, CIDEr-D) and COCO's caption files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipelines.errors import InputError
from pipelines.evaluate.captions import bleu, cider_d, read_coco_captions, read_predictions, tokenize


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("A dog runs.", ["a", "dog", "runs"]),
        ('The "big" dog, (brown) -- runs; fast!?', ["the", "big", "dog", "brown", "runs", "fast"]),
        ("A man's dog doesn't run...", ["a", "man", "'s", "dog", "does", "n't", "run"]),
        ("A black-and-white cat at 3.5 m/s & more", ["a", "black-and-white", "cat", "at", "3.5", "m/s", "&", "more"]),
        ("  'quoted'  ", ["quoted"]),
        ("", []),
    ],
)
def test_tokenize(text: str, words: list[str]) -> None:
    assert tokenize(text) == words


def test_bleu_by_hand_with_brevity_penalty() -> None:
    # Candidate "the cat sat" (3 words); references of 6 and 4 words: the closest length is 4.
    # Precisions: 1-grams 3/3, 2-grams 2/2 ("the cat", "cat sat"), 3-grams 1/1; no 4-gram at all, so coco-caption's
    # (0 + 1e-15) / (0 + 1e-9) = 1e-6. Brevity penalty exp(1 - 4/3) = exp(-1/3) = 0.71653.
    # BLEU-1..3 = 0.71653; BLEU-4 = (1 * 1 * 1 * 1e-6) ** (1/4) * 0.71653 = 0.031623 * 0.71653 = 0.022659.
    scores = bleu({"1": "The cat sat."}, {"1": ["the cat sat on the mat", "A cat sat here."]})
    penalty = math.exp(-1 / 3)
    assert scores == pytest.approx([penalty, penalty, penalty, 1e-6**0.25 * penalty], rel=1e-8)
    assert scores[3] == pytest.approx(0.022659, abs=1e-6)


def test_bleu_clips_sums_over_the_corpus_and_breaks_ties_to_the_shorter() -> None:
    # "the" four times against one "the": 1 of 4 counts; the candidate is longer, no penalty.
    assert bleu({"1": "the the the the"}, {"1": ["the cat"]}, n=1) == pytest.approx([0.25])
    # Corpus level: (2 + 1) matches of (2 + 4) 1-grams = 0.5, not the mean of 1.0 and 0.25; lengths 6 and 6.
    assert bleu({"1": "a b", "2": "c d e f"}, {"1": ["a b"], "2": ["c x y z"]}, n=1) == pytest.approx([0.5])
    # 3 words between references of 2 and 4: the tie goes to 2, shorter than the candidate, so no penalty.
    assert bleu({"1": "a b c"}, {"1": ["a b", "a b c d"]}, n=1) == pytest.approx([1.0])


def test_bleu_perfect_and_worse() -> None:
    references = {"1": ["a dog runs on the grass", "a brown dog is running"], "2": ["two cats sleep on a sofa"]}
    perfect = bleu({"1": "A dog runs on the grass.", "2": "two cats sleep on a sofa"}, references)
    assert perfect == pytest.approx([1.0] * 4, abs=1e-8)  # tiny / small leave it 1e-9 short of 1
    good = bleu({"1": "a dog runs on grass", "2": "two cats sleep on a sofa"}, references)
    worse = bleu({"1": "a dog runs", "2": "cats on a bed"}, references)
    assert all(p > g > w for p, g, w in zip(perfect, good, worse, strict=True))


# Two images whose captions share only "a" and "on" (document frequency 2: weight log 2 - log 2 = 0); every other
# n-gram is in one image's references (weight log 2 - log 1). A candidate equal to its one reference: for each
# order the two vectors are equal and nonzero, so the clipped product over the norms is 1; no length difference;
# the mean over four orders, times 10, is 10.
PERFECT = {"1": "a dog runs on grass", "2": "a cat sleeps on sofa"}


def test_cider_d_perfect_corpus_is_10() -> None:
    score, per_image = cider_d(PERFECT, {k: [v] for k, v in PERFECT.items()})
    assert score == pytest.approx(10.0) and per_image == pytest.approx({"1": 10.0, "2": 10.0})


def test_cider_d_by_hand() -> None:
    references = {"1": ["a b c d"], "2": ["w x y z"]}  # every n-gram in one image: weight log 2 each
    # Image 1's candidate adds "e": k-grams of the candidate 6 - k, of the reference 5 - k, 5 - k shared, so the
    # cosine is (5 - k) / sqrt((6 - k)(5 - k)); the length (bigrams) differs by 1: exp(-1 / (2 * 6^2)).
    score, per_image = cider_d({"1": "a b c d e", "2": "w x y z"}, references)
    cosines = [(5 - k) / math.sqrt((6 - k) * (5 - k)) for k in range(1, 5)]
    expected = 10 * math.exp(-1 / 72) * sum(cosines) / 4
    assert per_image["1"] == pytest.approx(expected) and per_image["1"] == pytest.approx(8.0969, abs=1e-4)
    assert score == pytest.approx((expected + 10) / 2)


def test_cider_d_clips_and_averages_over_references() -> None:
    references = {"1": ["a b"], "2": ["x y"]}
    # "a a": its 1-gram weight 2w against the reference's w is clipped to w: w * w / (2w * sqrt(2) w) = 1 / (2
    # sqrt 2); no shared 2-gram, no 3- or 4-grams; the mean over 4 orders times 10. Unclipped it would be twice that.
    _, per_image = cider_d({"1": "a a", "2": "x y"}, references)
    assert per_image["1"] == pytest.approx(10 * (1 / (2 * math.sqrt(2))) / 4)
    assert per_image["2"] == pytest.approx(10 * 2 / 4)  # 1- and 2-grams match, no 3- or 4-grams
    # A reference the candidate matches and one it does not (same length): the mean of 10 and 0.
    _, per_image = cider_d({"1": "p q r s", "2": "x y z w"}, {"1": ["p q r s", "t u v o"], "2": ["x y z w"]})
    assert per_image["1"] == pytest.approx(5.0)


def test_cider_d_sanity() -> None:
    references = {
        "1": ["a dog runs on the grass", "a brown dog running in a park", "the dog is running outside"],
        "2": ["two cats sleep on a sofa", "cats sleeping on a couch", "two cats lie on the sofa"],
        "3": ["a man rides a red bike", "a person riding a bicycle on the road", "a cyclist on a red bike"],
    }
    good = {"1": "a dog running on the grass", "2": "two cats sleeping on a sofa", "3": "a man riding a red bike"}
    worse = dict(good, **{"1": "a dog on a sofa"})
    worst = dict(worse, **{"3": "a cat"})
    scores = [cider_d(c, references)[0] for c in (good, worse, worst)]
    assert scores[0] > scores[1] > scores[2] >= 0
    assert cider_d(good, references)[1]["2"] == cider_d(worse, references)[1]["2"]
    assert cider_d({"1": "a dog"}, {"1": ["a dog"]})[0] == 0.0  # one image: log 1 - log 1, every weight 0


def test_scores_need_references_for_every_candidate() -> None:
    for score in (bleu, cider_d):
        with pytest.raises(InputError, match="image 2"):
            score({"1": "a", "2": "b"}, {"1": ["a"], "2": []})
        with pytest.raises(InputError, match="no captions"):
            score({}, {"1": ["a"]})


def write(path: Path, doc: object) -> str:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding="utf-8")
    return str(path)


def test_read_coco_files(tmp_path: Path) -> None:
    annotations = {
        "images": [{"id": 1}, {"id": 2}],
        "annotations": [
            {"image_id": 1, "id": 10, "caption": "A dog."},
            {"image_id": 2, "id": 11, "caption": "A cat."},
            {"image_id": 1, "id": 12, "caption": "A brown dog."},
        ],
    }
    references = read_coco_captions(write(tmp_path / "captions_val.json", annotations))
    assert references == {"1": ["A dog.", "A brown dog."], "2": ["A cat."]}
    results = [{"image_id": 2, "caption": "a cat"}, {"image_id": "1", "caption": "a dog", "score": 0.5}]
    assert read_predictions(write(tmp_path / "results.json", results), references) == {"2": "a cat", "1": "a dog"}


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ("{not json", "not a JSON file"),
        ({"images": []}, "not a COCO captions file"),
        ({"annotations": [{"image_id": 1}]}, "annotation 0 is not an object with image_id and caption"),
        ({"annotations": [{"image_id": 1, "caption": 3}]}, "annotation 0 needs"),
        ({"annotations": []}, "no annotations"),
    ],
)
def test_read_coco_captions_errors(tmp_path: Path, doc: object, words: str) -> None:
    path = write(tmp_path / "captions.json", doc)
    with pytest.raises(InputError) as e:
        read_coco_captions(path)
    assert path in str(e.value) and words in str(e.value)


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ("[{", "not a JSON file"),
        ({"image_id": 1, "caption": "a"}, "not a COCO results file"),
        ([{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}], "image 1 has two captions (results 0, 1)"),
        ([{"image_id": 1, "caption": "a"}, {"caption": "b"}], "result 1 is not an object"),
        ([{"image_id": 1, "caption": "a"}, {"image_id": 7, "caption": "b"}], "1 captioned images have no reference"),
        ([], "no results"),
    ],
)
def test_read_predictions_errors(tmp_path: Path, doc: object, words: str) -> None:
    path = write(tmp_path / "results.json", doc)
    with pytest.raises(InputError) as e:
        read_predictions(path, {"1": ["a dog"]})
    assert path in str(e.value) and words in str(e.value)


def test_missing_files_are_named(tmp_path: Path) -> None:
    for read in (read_coco_captions, read_predictions):
        with pytest.raises(InputError, match=f"file not found: {tmp_path / 'none.json'}"):
            read(str(tmp_path / "none.json"))
