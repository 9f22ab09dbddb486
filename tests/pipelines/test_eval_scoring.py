"""MME's reader (both layouts), yes/no parsing and score by hand; the VQA set's reader, choices and accuracy."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.errors import InputError
from pipelines.evaluate.mme import (
    COGNITION,
    PERCEPTION,
    Question,
    mme_prompt,
    parse_yes_no,
    read_mme,
    score_mme,
)
from pipelines.evaluate.vqa import (
    CHOICE_INSTRUCTION,
    KINDS,
    Item,
    choice_prompt,
    normalize_answer,
    parse_choice,
    read_vqa,
    score_vqa,
)

Q = "Is there a dog in this image? Please answer yes or no."


def flat(folder: Path, images: dict[str, str]) -> None:
    """A subtask in the flat layout: each image with its .txt beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in images.items():
        (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n" if name.endswith(".png") else b"\xff\xd8\xff\xe0")
        (folder / (name.rsplit(".", 1)[0] + ".txt")).write_text(text, encoding="utf-8", newline="")


def split(folder: Path, images: dict[str, str]) -> None:
    """A subtask in the split layout: images/ and questions_answers_YN/."""
    (folder / "images").mkdir(parents=True)
    (folder / "questions_answers_YN").mkdir()
    for name, text in images.items():
        (folder / "images" / name).write_bytes(b"\xff\xd8\xff\xe0")
        (folder / "questions_answers_YN" / (name.rsplit(".", 1)[0] + ".txt")).write_text(text, encoding="utf-8")


def two(first: str = "Yes", second: str = "No") -> str:
    return f"{Q}\t{first}\nIs there a cat in this image? Please answer yes or no.\t{second}\n"


@pytest.fixture
def mme(tmp_path: Path) -> Path:
    root = tmp_path / "MME_Benchmark_release_version"
    flat(root / "OCR", {"b.jpg": two(), "a.jpg": two("No", "Yes")})
    flat(root / "existence", {"x.jpg": two()})
    split(root / "artwork", {"10.jpg": two()})
    flat(root / "code_reasoning", {"c.png": two()})
    (root / "eval_tool").mkdir()  # not a subtask: left alone
    (root / "readme.txt").write_text("a file beside the subtasks")
    return root


def test_read_both_layouts_in_order(mme: Path) -> None:
    questions = read_mme(str(mme))
    assert [q.qid for q in questions] == [
        "existence/x.jpg/0",
        "existence/x.jpg/1",
        "artwork/10.jpg/0",
        "artwork/10.jpg/1",
        "OCR/a.jpg/0",
        "OCR/a.jpg/1",
        "OCR/b.jpg/0",
        "OCR/b.jpg/1",
        "code_reasoning/c.png/0",
        "code_reasoning/c.png/1",
    ]
    first = questions[0]
    assert first == Question("existence", str(mme / "existence" / "x.jpg"), Q, "yes", "existence/x.jpg/0")
    assert questions[2].image == str(mme / "artwork" / "images" / "10.jpg")
    assert [q.answer for q in questions[4:6]] == ["no", "yes"]
    assert [q.subtask for q in read_mme(str(mme), ["code_reasoning", "OCR"])] == ["OCR"] * 4 + ["code_reasoning"] * 2


def test_lenient_with_bom_crlf_trailing_spaces_and_blank_lines(tmp_path: Path) -> None:
    flat(tmp_path / "count", {"n.jpg": f"\ufeff{Q}\tYes \r\n\r\n{Q} \t no\t\r\n"})
    assert [(q.question, q.answer) for q in read_mme(str(tmp_path))] == [(Q, "yes"), (Q, "no")]


def test_subtask_names_are_mme_folders() -> None:
    assert len(PERCEPTION) == 10 and len(COGNITION) == 4
    assert "OCR" in PERCEPTION and "posters" in PERCEPTION and "commonsense_reasoning" in COGNITION


def error(call, *args) -> str:
    with pytest.raises(InputError) as e:
        call(*args)
    return str(e.value)


def test_folder_errors_name_the_path(tmp_path: Path, mme: Path) -> None:
    assert str(tmp_path / "nope") in error(read_mme, str(tmp_path / "nope"))
    (tmp_path / "other").mkdir()
    message = error(read_mme, str(tmp_path))
    assert str(tmp_path) in message and "existence" in message and "code_reasoning" in message
    assert str(mme) in message  # the release folder one level down is suggested
    message = error(read_mme, str(mme), ["existence", "Existance"])
    assert "'Existance'" in message and "text_translation" in message
    message = error(read_mme, str(mme), ["count"])
    assert str(mme) in message and "count" in message


@pytest.mark.parametrize(
    ("make", "named", "words"),
    [
        (lambda r: flat(r / "color", {"a.jpg": f"{Q} Yes\n"}), "color/a.txt line 1", "question<TAB>"),
        (lambda r: flat(r / "color", {"a.jpg": f"{Q}\tYes\n\n{Q}\tMaybe\n"}), "color/a.txt line 3", "'maybe'"),
        (lambda r: flat(r / "color", {"a.jpg": "\n"}), "color/a.txt", "no questions"),
        (lambda r: (r / "scene").mkdir(), "scene", "empty MME subtask folder"),
        (lambda r: (r / "scene" / "images").mkdir(parents=True), "scene/questions_answers_YN", "images"),
    ],
)
def test_file_errors_name_the_file_and_line(tmp_path: Path, make, named: str, words: str) -> None:
    make(tmp_path)
    message = error(read_mme, str(tmp_path))
    assert str(tmp_path / named) in message and words in message


def test_an_image_and_its_answers_come_together(tmp_path: Path) -> None:
    flat(tmp_path / "position", {"a.jpg": two()})
    (tmp_path / "position" / "a.txt").unlink()
    message = error(read_mme, str(tmp_path))
    assert str(tmp_path / "position" / "a.jpg") in message and "a.txt" in message
    split(tmp_path / "landmark", {"l.jpg": two()})
    (tmp_path / "landmark" / "images" / "l.jpg").unlink()
    (tmp_path / "position" / "a.txt").write_text(two())
    message = error(read_mme, str(tmp_path))
    assert str(tmp_path / "landmark" / "questions_answers_YN" / "l.txt") in message and "without an image" in message


@pytest.mark.parametrize(
    ("answer", "parsed"),
    [
        ("Yes", "yes"),
        ("Yes.", "yes"),
        ("yes, it is", "yes"),
        ("**No**", "no"),
        ("No, there is not", "no"),
        ("The answer is yes.", "yes"),
        ("  `NO`  ", "no"),
        ("Yes, there is no dog.", "yes"),
        ("Answer: No", "no"),
        ("There is no dog.", "no"),
        ("yes or no", None),
        ("No or yes?", None),
        ("I don't know", None),
        ("not sure", None),
        ("Nope", None),
        ("yesterday", None),
        ("", None),
        ("It could be yes, it could be no", None),
    ],
)
def test_parse_yes_no(answer: str, parsed: str | None) -> None:
    assert parse_yes_no(answer) == parsed


def test_prompt_keeps_the_released_question() -> None:
    assert mme_prompt(Q) == Q and mme_prompt(f" {Q} ") == Q
    assert mme_prompt("Is there a dog?") == "Is there a dog? Please answer yes or no."
    assert mme_prompt("Is there a dog? Please answer yes or no") == "Is there a dog? Please answer yes or no"


def q(subtask: str, image: str, index: int, answer: str) -> Question:
    return Question(subtask, f"/mme/{subtask}/{image}", "?", answer, f"{subtask}/{image}/{index}")


def test_score_by_hand() -> None:
    records = [
        # existence: image a one of two right, image b both: acc 3/4 = 75, acc+ 1/2 = 50, score 125
        (q("existence", "a", 0, "yes"), "yes"),
        (q("existence", "a", 1, "no"), "yes"),
        (q("existence", "b", 0, "yes"), "yes"),
        (q("existence", "b", 1, "no"), "no"),
        # OCR: one unparseable (wrong), one right: acc 50, acc+ 0, score 50
        (q("OCR", "c", 0, "yes"), None),
        (q("OCR", "c", 1, "no"), "no"),
        # code_reasoning: both right: 100 + 100
        (q("code_reasoning", "d", 0, "no"), "no"),
        (q("code_reasoning", "d", 1, "yes"), "yes"),
    ]
    score = score_mme(records[4:] + records[:4])  # any order
    assert list(score.subtasks) == ["existence", "OCR", "code_reasoning"]
    existence, ocr = score.subtasks["existence"], score.subtasks["OCR"]
    assert (existence.questions, existence.images, existence.correct, existence.images_correct) == (4, 2, 3, 1)
    assert (existence.accuracy, existence.accuracy_plus, existence.score) == (75.0, 50.0, 125.0)
    assert (ocr.accuracy, ocr.accuracy_plus, ocr.score, ocr.unparseable) == (50.0, 0.0, 50.0, 1)
    assert existence.unparseable == 0
    assert (score.perception, score.perception_subtasks) == (175.0, 2)
    assert (score.cognition, score.cognition_subtasks) == (200.0, 1)
    as_dict = score.to_dict()
    assert as_dict["subtasks"]["OCR"]["unparseable"] == 1 and as_dict["perception"] == 175.0
    assert "perception 175.00 (2 of 10 subtasks)" in score.summary()


def test_score_of_read_questions_and_refusals(mme: Path) -> None:
    questions = read_mme(str(mme), ["existence"])
    perfect = score_mme((x, x.answer) for x in questions)
    assert perfect.perception == 200.0 and perfect.cognition == 0.0 and perfect.cognition_subtasks == 0
    assert score_mme([]).subtasks == {}
    with pytest.raises(ValueError, match="parse_yes_no"):
        score_mme([(questions[0], "Yes.")])
    with pytest.raises(ValueError, match="scored twice"):
        score_mme([(questions[0], "yes"), (questions[0], "no")])


def write_vqa(tmp_path: Path, *lines: str) -> str:
    (tmp_path / "media").mkdir(exist_ok=True)
    for name in ("dog.jpg", "bark.wav", "chair.pt"):
        (tmp_path / "media" / name).write_bytes(b"x")
    path = tmp_path / "set" / "questions.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_read_vqa(tmp_path: Path) -> None:
    path = write_vqa(
        tmp_path,
        '{"image": "../media/dog.jpg", "question": "Is there a dog?", "answer": "Yes"}',
        "",
        '{"id": "q7", "image": ["../media/dog.jpg"], "audio": "../media/bark.wav", "question": "What barks?",'
        ' "choices": ["a cat", "a dog"], "answer": "B"}',
        f'{{"point": "{tmp_path / "media" / "chair.pt"}", "question": "How many legs?", "answer": 4}}',
    )
    first, second, third = read_vqa(path)
    assert first == Item("1", {"image": [str(tmp_path / "media" / "dog.jpg")]}, "Is there a dog?", "Yes")
    assert (first.kind, second.kind, third.kind) == ("yes/no", "choice", "open")
    assert second.qid == "q7" and list(second.inputs) == ["image", "audio"]
    assert second.choices == ("a cat", "a dog") and second.answer == "a dog"  # the letter, as the choice's text
    assert third.qid == "4" and third.inputs == {"point": [str(tmp_path / "media" / "chair.pt")]}
    assert third.answer == "4"
    prompt = choice_prompt(second)
    assert prompt == f"What barks?\nA. a cat\nB. a dog\n{CHOICE_INSTRUCTION}"


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('{"image": "../media/dog.jpg", "question": "Q?"', "not JSON"),
        ('["image"]', "expected a JSON object"),
        ('{"image": "../media/dog.jpg", "answer": "yes"}', "question: missing"),
        ('{"image": "../media/dog.jpg", "question": "Q?"}', "answer: missing"),
        ('{"question": "Q?", "answer": "yes"}', "no input"),
        ('{"image": [], "question": "Q?", "answer": "yes"}', "no input"),
        ('{"image": "../media/dog.jpg", "question": "Q?", "answer": "yes", "depth": "d.png"}', "depth: unknown field"),
        ('{"image": "../media/cat.jpg", "question": "Q?", "answer": "yes"}', "image file not found: ../media/cat.jpg"),
        ('{"image": "../media/dog.jpg", "question": "Q?", "answer": "C", "choices": ["x", "y"]}', "not among"),
        ('{"image": "../media/dog.jpg", "question": "Q?", "answer": "x", "choices": ["x"]}', "between 2 and 26"),
        ('{"image": "../media/dog.jpg", "question": "Q?", "answer": "x", "choices": ["x", "X"]}', "same text"),
        ('{"image": 3, "question": "Q?", "answer": "yes"}', "expected a path or a list of paths"),
    ],
)
def test_read_vqa_errors_name_the_file_and_line(tmp_path: Path, line: str, words: str) -> None:
    good = '{"image": "../media/dog.jpg", "question": "Q?", "answer": "yes"}'
    path = write_vqa(tmp_path, good, line)
    message = error(read_vqa, path)
    assert f"{path} line 2: " in message and words in message


def test_read_vqa_file_errors(tmp_path: Path) -> None:
    assert str(tmp_path / "no.jsonl") in error(read_vqa, str(tmp_path / "no.jsonl"))
    good = '{"id": 5, "image": "../media/dog.jpg", "question": "Q?", "answer": "yes"}'
    path = write_vqa(tmp_path, good, good)
    assert f"{path} line 2: id '5' is also on line 1" in error(read_vqa, path)
    path = write_vqa(tmp_path, "", " ")
    assert f"{path}: no questions" in error(read_vqa, path)


CHOICES = ("red", "dark red", "blue", "green")


@pytest.mark.parametrize(
    ("answer", "index"),
    [
        ("B", 1),
        ("(B)", 1),
        ("B.", 1),
        ("b", 1),
        ("**C**", 2),
        ("The answer is B", 1),
        ("the answer is c.", 2),
        ("Answer: (D)", 3),
        ("Option (C) is right", 2),
        ("C. blue", 2),
        ("Blue", 2),
        ("blue.", 2),
        ("It is dark red.", 1),
        ("I think green", 3),
        ("E", None),
        ("The answer is E", None),
        ("The answer is a cat", None),
        ("A or B", None),
        ("The answer is A or B", None),
        ("red or blue", None),
        ("purple", None),
        ("", None),
    ],
)
def test_parse_choice(answer: str, index: int | None) -> None:
    assert parse_choice(answer, CHOICES) == index


def test_parse_choice_text_before_letters() -> None:
    assert parse_choice("Either A or B", ["Only A", "Either A or B"]) == 1
    assert parse_choice("**the_end**", ["the_end", "a start"]) == 0


def test_score_vqa_by_kind() -> None:
    image = {"image": ["/x.jpg"]}
    yes = Item("1", image, "Q?", "yes")
    no = Item("2", image, "Q?", "No")
    pick = Item("3", image, "Q?", "blue", CHOICES)
    count = Item("4", image, "How many?", "2 dogs")
    records = [(yes, "Yes."), (no, "I am not sure"), (pick, "C"), (count, "Two dogs.")]
    result = score_vqa(records)
    assert (result["questions"], result["correct"], result["unparseable"]) == (4, 3, 1)
    assert result["accuracy"] == 75.0
    assert result["by_kind"] == {
        "yes/no": {"questions": 2, "correct": 1, "unparseable": 1, "accuracy": 50.0},
        "choice": {"questions": 1, "correct": 1, "unparseable": 0, "accuracy": 100.0},
        "open": {"questions": 1, "correct": 1, "unparseable": 0, "accuracy": 100.0},
    }
    wrong = score_vqa([(pick, "The answer is A"), (count, "three dogs"), (yes, "")])
    assert wrong["correct"] == 0 and wrong["unparseable"] == 1 and set(wrong["by_kind"]) == set(KINDS)
    assert normalize_answer("The  two DOGS!") == "2 dogs"
    with pytest.raises(ValueError, match="scored twice"):
        score_vqa([(yes, "yes"), (yes, "yes")])
