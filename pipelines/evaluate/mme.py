"""MME (Fu et al. 2023): its released yes/no questions, the prompt they are asked with, and its official score."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from pipelines.config.names import MME_COGNITION, MME_PERCEPTION, MME_SUBTASKS
from pipelines.errors import InputError, folder_expected

# The folder names of MME_Benchmark_release_version (pipelines.config.names, where the config checks them too).
PERCEPTION, COGNITION, SUBTASKS = MME_PERCEPTION, MME_COGNITION, MME_SUBTASKS
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLIT_DIRS = ("images", "questions_answers_YN")  # the layout of artwork, celebrity, landmark, posters, scene
RELEASE_FOLDER = "MME_Benchmark_release_version"

# The released questions end with "Please answer yes or no." and are asked as they are: LLaMA-Adapter V2.1's
# MME script (llama_adapter_v2_multimodal7b/util/evaluate_mme.py in OpenGVLab/LLaMA-Adapter) passes the question
# unchanged into the Alpaca template (its system line there reads "... using a single word or phrase."), greedy, at
# most 30 new tokens. The repository's imagebind_LLM folder has no MME script of its own.
MME_PROMPT_SUFFIX = "Please answer yes or no."


@dataclass(frozen=True)
class Question:
    """One MME question about one image; `answer` is "yes" or "no"."""

    subtask: str
    image: str  # absolute path
    question: str
    answer: str
    qid: str  # "<subtask>/<image file name>/<index of the question in its file, from 0>"


def read_mme(data_dir: str, subtasks: Sequence[str] | None = None) -> list[Question]:
    """The questions of MME's released folder (every subtask found there, or the given `subtasks`), in SUBTASKS
    order, then by image file name, then in file order; an InputError naming the path of anything unusable.

    A subtask folder holds images with a same-stem .txt beside each, or `images/` and `questions_answers_YN/`;
    each .txt line is `question<TAB>Yes|No`. Folders with other names are left alone.
    """
    if not os.path.isdir(data_dir):
        raise InputError(folder_expected("MME", data_dir))
    if subtasks is not None:
        unknown = [s for s in subtasks if s not in SUBTASKS]
        if unknown:
            raise InputError(f"unknown MME subtask {', '.join(map(repr, unknown))}: MME has {', '.join(SUBTASKS)}")
    present = [s for s in SUBTASKS if os.path.isdir(os.path.join(data_dir, s))]
    if not present:
        inner = os.path.join(data_dir, RELEASE_FOLDER)
        hint = f" (did you mean {inner}?)" if os.path.isdir(inner) else ""
        raise InputError(f"{data_dir}: no MME subtask folder{hint}; expected some of {', '.join(SUBTASKS)}")
    wanted = present if subtasks is None else [s for s in SUBTASKS if s in subtasks]
    missing = [s for s in wanted if s not in present]
    if missing:
        raise InputError(f"{data_dir}: no folder for MME subtask {', '.join(missing)}")
    questions: list[Question] = []
    for subtask in wanted:
        questions += _read_subtask(os.path.join(os.path.abspath(data_dir), subtask), subtask)
    return questions


def _read_subtask(folder: str, subtask: str) -> list[Question]:
    split = [os.path.join(folder, d) for d in SPLIT_DIRS]
    if any(os.path.isdir(d) for d in split):
        for d in split:
            if not os.path.isdir(d):
                raise InputError(f"{folder}: has {' or '.join(SPLIT_DIRS)} but not {d}")
        image_dir, answer_dir = split
    else:
        image_dir = answer_dir = folder
    images = _files(image_dir, IMAGE_SUFFIXES)
    answers = _files(answer_dir, (".txt",))
    if not images and not answers:
        raise InputError(f"{folder}: empty MME subtask folder (no images, no .txt answer files)")
    stems: dict[str, str] = {}
    for name in images:
        stem = os.path.splitext(name)[0]
        if stem in stems:
            raise InputError(f"{image_dir}: two images named {stem}: {stems[stem]} and {name}")
        stems[stem] = name
    for name in answers:
        if os.path.splitext(name)[0] not in stems:
            raise InputError(f"{os.path.join(answer_dir, name)}: answer file without an image of the same name")
    questions = []
    for name in images:
        txt = os.path.join(answer_dir, os.path.splitext(name)[0] + ".txt")
        image = os.path.join(image_dir, name)
        if not os.path.isfile(txt):
            raise InputError(f"{image}: no answer file {txt}")
        for index, (question, answer) in enumerate(_read_answers(txt)):
            questions.append(Question(subtask, image, question, answer, f"{subtask}/{name}/{index}"))
    return questions


def _files(folder: str, suffixes: tuple[str, ...]) -> list[str]:
    return sorted(
        n for n in os.listdir(folder) if n.lower().endswith(suffixes) and os.path.isfile(os.path.join(folder, n))
    )


def _read_answers(path: str) -> list[tuple[str, str]]:
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is dropped
            lines = f.read().splitlines()  # \n, \r\n or \r
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e})") from None
    pairs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        question, tab, answer = line.rstrip().rpartition("\t")
        if not tab or not question.strip():
            raise InputError(f"{path} line {number}: expected 'question<TAB>Yes|No', got {line.strip()[:80]!r}")
        answer = answer.strip().lower()
        if answer not in ("yes", "no"):
            raise InputError(f"{path} line {number}: the answer is {answer!r}, not Yes or No")
        pairs.append((question.strip(), answer))
    if not pairs:
        raise InputError(f"{path}: no questions")
    return pairs


def mme_prompt(question: str) -> str:
    """The question as MME asks it: as released, with MME_PROMPT_SUFFIX added only where it is missing."""
    question = question.strip()
    if question.rstrip(".").lower().endswith(MME_PROMPT_SUFFIX.rstrip(".").lower()):
        return question
    return f"{question} {MME_PROMPT_SUFFIX}"


_MARKUP = re.compile(r"[*_`#>\"“”‘’]")
_WORD = re.compile(r"[a-z]+")


def parse_yes_no(answer: str) -> str | None:
    """The answer read as "yes" or "no", or None when it says neither clearly.

    The rule, on the answer lower-cased with markdown marks and quotes (* _ ` # > " “ ” ‘ ’) removed: if its first
    word is yes or no, that word ("Yes, there is no dog" is yes), unless it starts "yes or no", "no and yes" (None);
    otherwise the one of yes/no that appears as a whole word ("The answer is yes."), and None when both or neither
    do ("I don't know", "nope"). MME's eval_tool instead looks for "yes", then "no",
    in the answer's first four characters, so "not sure" is "no" there and None here.
    """
    words = _WORD.findall(_MARKUP.sub(" ", answer.lower()))
    if words[1:3] in (["or", "no"], ["or", "yes"], ["and", "no"], ["and", "yes"]) and words[0] != words[2]:
        return None  # "yes or no", "no and yes": both
    if words and words[0] in ("yes", "no"):
        return words[0]
    found = {w for w in words if w in ("yes", "no")}
    return found.pop() if len(found) == 1 else None


@dataclass(frozen=True)
class SubtaskScore:
    """One subtask's counts and score: accuracy over questions, accuracy+ over images (every question right)."""

    subtask: str
    questions: int
    images: int
    correct: int
    images_correct: int
    unparseable: int  # answers parse_yes_no could not read: counted wrong
    accuracy: float  # percent
    accuracy_plus: float  # percent
    score: float  # accuracy + accuracy_plus, at most 200


@dataclass(frozen=True)
class MMEScore:
    """Per-subtask scores (only the subtasks scored) and the perception (max 2000) and cognition (max 800) totals,
    each the sum over the subtasks it covers."""

    subtasks: dict[str, SubtaskScore]
    perception: float
    perception_subtasks: int  # of len(PERCEPTION)
    cognition: float
    cognition_subtasks: int  # of len(COGNITION)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"MME perception {self.perception:.2f} ({self.perception_subtasks} of {len(PERCEPTION)} subtasks), "
            f"cognition {self.cognition:.2f} ({self.cognition_subtasks} of {len(COGNITION)} subtasks)"
        )


def score_mme(records: Iterable[tuple[Question, str | None]]) -> MMEScore:
    """MME's score of (question, parsed prediction: "yes", "no" or None) records; a subtask is scored when it has
    records, and an image's accuracy+ needs every one of its questions right (MME has two per image)."""
    seen: set[str] = set()
    by_image: dict[str, dict[str, list[bool]]] = {}
    unparseable: dict[str, int] = {}
    for question, prediction in records:
        if prediction not in ("yes", "no", None):
            raise ValueError(f"{question.qid}: prediction {prediction!r} is not yes, no or None: use parse_yes_no")
        if question.qid in seen:
            raise ValueError(f"{question.qid}: scored twice")
        seen.add(question.qid)
        by_image.setdefault(question.subtask, {}).setdefault(question.image, []).append(prediction == question.answer)
        unparseable[question.subtask] = unparseable.get(question.subtask, 0) + (prediction is None)
    scores = {}
    for subtask in sorted(by_image, key=lambda s: (SUBTASKS.index(s) if s in SUBTASKS else len(SUBTASKS), s)):
        images = by_image[subtask].values()
        n_questions = sum(len(r) for r in images)
        correct = sum(sum(r) for r in images)
        images_correct = sum(all(r) for r in images)
        accuracy, accuracy_plus = 100.0 * correct / n_questions, 100.0 * images_correct / len(images)
        scores[subtask] = SubtaskScore(
            subtask,
            n_questions,
            len(images),
            correct,
            images_correct,
            unparseable[subtask],
            accuracy,
            accuracy_plus,
            accuracy + accuracy_plus,
        )
    perception = [s.score for name, s in scores.items() if name in PERCEPTION]
    cognition = [s.score for name, s in scores.items() if name in COGNITION]
    return MMEScore(scores, sum(perception), len(perception), sum(cognition), len(cognition))
