"""The noun phrases of an answer (what grounding looks for): a small rule-based chunker, or spaCy's when configured."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable

from pipelines.errors import InputError


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


DETERMINERS = _words(
    "a an the this that these those some any each every either neither no another other such what which whose "
    "all both half several many much few more most one two three four five six seven eight nine ten eleven twelve "
    "dozen hundred thousand first second third last next"
)
PRONOUNS = _words(
    "i me my mine myself you your yours yourself we us our ours ourselves he him his himself she her hers herself "
    "it its itself they them their theirs themselves there here who whom whoever something anything nothing "
    "everything someone anyone everyone somebody anybody everybody nobody none"
)
PREPOSITIONS = _words(
    "of in on at to from by with without into onto upon over under above below beneath behind beside besides "
    "between among around across along through throughout near inside outside within against toward towards past "
    "about after before during until till like unlike than via per for off out up down"
)
CONJUNCTIONS = _words("and or but nor so yet if because while whereas although though as when where")
VERBS = _words(
    "is are was were be been being am do does did done doing have has had having can could will would shall should "
    "may might must seems seem seemed appears appear appeared looks look looked shows show showed shown depicts "
    "depict depicted features feature featured contains contain contained sits sit sat stands stand stood lies lie "
    "lay lying holds hold held wears wear wore worn rides ride rode runs run ran walks walk walked plays play played "
    "eats eat ate flies flew swims swim swam jumps jump jumped carries carry carried makes make made takes take "
    "took gets get got goes go went comes come came includes include included displays display displayed captures "
    "capture captured presents present presented uses use used rests rest rested hangs hang hung surrounds "
    "surround surrounded covers cover covered faces face faced"
)
ADVERBS = _words(
    "not very also just only really quite rather too so then now still even almost nearly probably possibly "
    "perhaps maybe likely clearly together away back again always never often sometimes yes no well how why "
    "where when mostly partly slightly"
)
ADJECTIVES = _words(
    "red orange yellow green blue purple pink brown black white grey gray golden silver dark light bright pale "
    "small large big little tiny huge tall short long wide narrow round square flat old young new wooden metal "
    "plastic glass fresh ripe happy sad cute beautiful pretty ugly clean dirty wet dry hot cold warm cool empty "
    "full open closed busy quiet sunny cloudy colorful colourful striped spotted fluffy furry "
    "shiny soft hard heavy thin thick fat calm wild same different similar main other certain real"
)
# Nouns that name the picture or a place in it, not a thing to find there.
ABSTRACT = _words(
    "image images picture pictures photo photos photograph photographs scene scenes view views frame shot snapshot "
    "background foreground side sides left right top bottom middle center centre front back corner edge part parts "
    "kind kinds type types sort lot lots thing things way ways time times moment area areas place places color "
    "colors colour colours object objects item items question answer caption description detail "
    "details rest number pair group setting environment atmosphere day night daytime morning evening"
)
STOP = DETERMINERS | PRONOUNS | PREPOSITIONS | CONJUNCTIONS | VERBS | ADVERBS
IRREGULAR_PLURALS = {
    "children": "child",
    "men": "man",
    "women": "woman",
    "people": "person",
    "feet": "foot",
    "teeth": "tooth",
    "mice": "mouse",
    "geese": "goose",
    "leaves": "leaf",
    "knives": "knife",
    "wolves": "wolf",
    "shelves": "shelf",
    "loaves": "loaf",
}
WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")
BREAK = re.compile(r"[.,;:!?()\[\]\"]+|'s\b|\s+")  # punctuation and possessives end a phrase


def singular(word: str) -> str:
    """A plural noun's singular, by rule ("boxes" -> "box", "berries" -> "berry"), for telling repeats apart."""
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if re.search(r"(ss|x|z|ch|sh)es$", word):
        return word[:-2]
    if word.endswith("s") and not re.search(r"(ss|us|is)$", word) and len(word) > 3:
        return word[:-1]
    return word


def is_adjective(word: str) -> bool:
    """In ADJECTIVES, or its comparative or superlative ("bigger", "larger", "happiest")."""
    if word in ADJECTIVES:
        return True
    stem = re.sub(r"(er|est)$", "", word)
    doubled = stem[:-1] if len(stem) > 2 and stem[-1] == stem[-2] else stem  # "bigg" -> "big"
    return stem != word and any(s in ADJECTIVES for s in (stem, doubled, stem + "e", re.sub(r"i$", "y", stem)))


def _is_verb_form(word: str, before: str | None) -> bool:
    """An -ing or -ed word is a verb unless a determiner or adjective stands before it ("a tall building")."""
    if not re.search(r"..(ing|ed)$", word):
        return False
    return not (before in DETERMINERS or (before is not None and is_adjective(before)))


def chunks(text: str) -> list[list[str]]:
    """Runs of words that may form a noun phrase: split at punctuation, stop words and verb forms."""
    out: list[list[str]] = []
    current: list[str] = []
    before: str | None = None
    for piece in BREAK.split(text.lower()):
        words = WORD.findall(piece) if piece else []
        if not words:  # a separator: the run ends
            out.append(current)
            current, before = [], None
            continue
        for word in words:
            if (
                word in STOP
                or word.isdigit()
                or _is_verb_form(word, before)
                or (word.endswith("ly") and word not in ADJECTIVES)
            ):
                out.append(current)
                current = []
            else:
                current.append(word)
            before = word
    out.append(current)
    return [c for c in out if c]


def clean(words: Iterable[str]) -> str | None:
    """A run as a phrase: trailing adjectives dropped (a predicate: "is red"); None when nothing to find is left."""
    words = [w for w in words if w not in STOP]
    while words and is_adjective(words[-1]):
        words.pop()
    if not words or words[-1] in ABSTRACT or singular(words[-1]) in ABSTRACT:
        return None
    return " ".join(words)


def dedupe(phrases: Iterable[str | None]) -> list[str]:
    """Phrases in first-seen order, one per singular form ("apples" again after "apples" or "apple" is dropped)."""
    seen, out = set(), []
    for phrase in phrases:
        if not phrase:
            continue
        key = " ".join(singular(w) for w in phrase.split())
        if key not in seen:
            seen.add(key)
            out.append(phrase)
    return out


def noun_phrases(text: str, spacy_model: str | None = None) -> list[str]:
    """The things an answer names, e.g. "A brown dog is running on the beach next to a red ball." -> ["brown dog",
    "beach", "red ball"]: lower case, without determiners, pronouns or picture words ("the image"), repeats dropped.

    With `spacy_model` (an installed spaCy pipeline's name or folder; never downloaded) its noun chunks are the
    runs, cleaned by the same rules.
    """
    if spacy_model:
        return dedupe(clean(WORD.findall(chunk.lower())) for chunk in spacy_chunks(text, spacy_model))
    return dedupe(clean(run) for run in chunks(text))


def spacy_chunks(text: str, model: str) -> list[str]:
    """spaCy's noun chunks of `text` with the installed pipeline `model`; InputError when it is not installed."""
    if importlib.util.find_spec("spacy") is None:
        raise InputError(
            f"model.noun_parser {model!r}: spaCy is not installed (pip install spacy, then install the "
            "pipeline), or unset model.noun_parser to use the built-in rules"
        )
    import spacy

    try:
        nlp = _SPACY.get(model) or _SPACY.setdefault(model, spacy.load(model))
    except OSError as e:
        raise InputError(f"model.noun_parser {model!r}: not an installed spaCy pipeline ({e})") from None
    return [chunk.text for chunk in nlp(text).noun_chunks]


_SPACY: dict[str, object] = {}
