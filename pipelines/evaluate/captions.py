"""Caption scores as coco-caption computes them (BLEU-1..4, CIDEr-D) in plain Python, and COCO's caption files."""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence

from pipelines.errors import InputError

# coco-caption's bleu_scorer.py: added to every clipped count (tiny) and n-gram count (small), so that a precision
# with nothing to count is tiny/small = 1e-6 rather than 0/0, and the brevity ratio never divides by zero.
TINY = 1e-15
SMALL = 1e-9

_NEGATION = re.compile(r"(\w)n't\b")
_CLITIC = re.compile(r"(\w)'(s|re|ve|m|ll|d)\b")
_TOKEN = re.compile(r"n't|'(?:s|re|ve|m|ll|d)\b|\w+(?:[-'./]\w+)*|\S")
_PUNCTUATION = re.compile(r"""[.,!?;:'"`()\[\]{}\-]+""")


def tokenize(text: str) -> list[str]:
    """The words of a caption as coco-caption's PTBTokenizer step leaves them, near enough: lower-cased, "n't" and
    the clitics 's 're 've 'm 'll 'd split off ("don't" -> "do n't"), words joined by - ' . / kept whole
    ("black-and-white", "3.5"), other symbols ($ % & +) single tokens, and punctuation tokens dropped.

    The differences from Stanford's PTB tokenizer (coco-caption runs it in Java, then drops . , ? ! ; : - -- ... and
    the quote and round/curly bracket tokens): brackets [ ] are dropped here (PTB keeps them as "-lsb-"/"-rsb-"), a
    trailing period of an abbreviation goes ("u.s." -> "u.s"), and PTB's finer rules (e.g. for URLs, emoticons,
    British spellings of quotes) are not reproduced.
    """
    text = _CLITIC.sub(r"\1 '\2", _NEGATION.sub(r"\1 n't", text.lower()))
    return [t for t in _TOKEN.findall(text) if not _PUNCTUATION.fullmatch(t)]


def _ngrams(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _tokenized(
    candidates: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> list[tuple[str, list[str], list[list[str]]]]:
    """(image, candidate words, reference words) of each candidate; an InputError for one without references."""
    if not candidates:
        raise InputError("no captions to score")
    rows = []
    for image, caption in candidates.items():
        refs = references.get(image)
        if not refs:
            raise InputError(f"image {image}: a caption to score but no reference captions")
        rows.append((image, tokenize(caption), [tokenize(r) for r in refs]))
    return rows


def bleu(candidates: Mapping[str, str], references: Mapping[str, Sequence[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..BLEU-n of one caption per image against its references, as coco-caption's Bleu.

    Clipped n-gram matches and n-gram counts are summed over the images; BLEU-k is the geometric mean of the
    precisions of 1..k-grams, each (matches + TINY) / (count + SMALL); the brevity penalty compares the total
    candidate length with the sum, over images, of the reference length closest to the candidate's (ties: the
    shorter). Only the images of `candidates` are scored; captions are split by `tokenize`.
    """
    correct, guesses = [0] * n, [0] * n
    test_len = ref_len = 0
    for _, words, refs in _tokenized(candidates, references):
        most: Counter[tuple[str, ...]] = Counter()
        for ref in refs:
            most |= _ngrams(ref, n)  # | keeps the larger count: an n-gram's most uses in any one reference
        for gram, count in _ngrams(words, n).items():
            correct[len(gram) - 1] += min(count, most[gram])
        for k in range(n):
            guesses[k] += max(0, len(words) - k)
        test_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in refs)[1]
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + TINY) / (guesses[k] + SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + TINY) / (ref_len + SMALL)
    penalty = math.exp(1.0 - 1.0 / ratio) if ratio < 1 else 1.0
    return [s * penalty for s in scores]


def cider_d(
    candidates: Mapping[str, str], references: Mapping[str, Sequence[str]], n: int = 4, sigma: float = 6.0
) -> tuple[float, dict[str, float]]:
    """(corpus CIDEr-D, each image's) of one caption per image, as coco-caption's Cider (which is CIDEr-D).

    An n-gram's weight is its count times log(images) - log(max(1, its document frequency)), the frequency counted
    over the images' reference sets (an image counts once however many of its references hold the n-gram). For each
    reference and each n-gram order, the candidate's vector against the reference's: sum of min(candidate weight,
    reference weight) * reference weight over the candidate's n-grams, divided by both norms (0 when either is 0),
    times the Gaussian exp(-delta^2 / (2 sigma^2)) of the length difference; averaged over the orders and the
    references, times 10. The length is, as in coco-caption, the number of bigrams (so with n=1 there is no length
    penalty). The corpus score is the mean over the images of `candidates`; captions are split by `tokenize`.
    """
    rows = _tokenized(candidates, references)
    refs_grams = [[_ngrams(r, n) for r in refs] for _, _, refs in rows]
    frequency: Counter[tuple[str, ...]] = Counter()
    for grams in refs_grams:
        frequency.update(set().union(*grams))
    log_images = math.log(len(rows))

    def vector(grams: Counter[tuple[str, ...]]) -> tuple[list[dict], list[float], int]:
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
        for gram, count in grams.items():
            vec[len(gram) - 1][gram] = count * (log_images - math.log(max(1.0, frequency[gram])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        bigrams = sum(grams[g] for g in vec[1]) if n > 1 else 0
        return vec, norms, bigrams

    scores = {}
    for (image, words, refs), ref_grams in zip(rows, refs_grams, strict=True):
        vec, norms, length = vector(_ngrams(words, n))
        total = 0.0
        for grams in ref_grams:
            ref_vec, ref_norms, ref_length = vector(grams)
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * sigma**2))
            for k in range(n):
                dot = sum(min(w, ref_vec[k].get(g, 0.0)) * ref_vec[k].get(g, 0.0) for g, w in vec[k].items())
                if norms[k] and ref_norms[k]:
                    dot /= norms[k] * ref_norms[k]
                total += dot * penalty
        scores[image] = 10.0 * total / n / len(refs)
    return sum(scores.values()) / len(scores), scores


def _load_json(path: str) -> object:
    if not os.path.isfile(path):
        raise InputError(f"file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a JSON file ({e})") from None


def _image_caption(path: str, what: str, row: object) -> tuple[str, str]:
    if not isinstance(row, dict) or "image_id" not in row or "caption" not in row:
        raise InputError(f"{path}: {what} is not an object with image_id and caption: {str(row)[:80]}")
    image, caption = row["image_id"], row["caption"]
    if isinstance(image, bool) or not isinstance(image, (int, str)) or not isinstance(caption, str):
        raise InputError(f"{path}: {what} needs an integer or string image_id and a string caption: {str(row)[:80]}")
    return str(image), caption


def read_coco_captions(path: str) -> dict[str, list[str]]:
    """The reference captions of a COCO captions annotation file ({"annotations": [{"image_id", "caption"}, ...]}),
    keyed by str(image_id), in file order; an InputError naming the file and what is wrong."""
    return _references(path, _load_json(path))


def read_coco(path: str) -> tuple[dict[str, list[str]], dict[str, str]]:
    """The reference captions of a COCO captions annotation file (as `read_coco_captions`) and its images' file
    names ({"images": [{"id", "file_name"}, ...]}) keyed by str(id), from one reading of the file."""
    doc = _load_json(path)
    references = _references(path, doc)
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise InputError(f"{path}: no `images` list (each with id and file_name)")
    files = {}
    for i, entry in enumerate(images):
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("file_name"), str):
            raise InputError(f"{path}: images[{i}] needs an id and a file_name")
        files[str(entry["id"])] = entry["file_name"]
    return references, files


def _references(path: str, doc: object) -> dict[str, list[str]]:
    if not isinstance(doc, dict) or not isinstance(doc.get("annotations"), list):
        raise InputError(f"{path}: not a COCO captions file (an object with an 'annotations' list)")
    references: dict[str, list[str]] = {}
    for i, row in enumerate(doc["annotations"]):
        image, caption = _image_caption(path, f"annotation {i}", row)
        references.setdefault(image, []).append(caption)
    if not references:
        raise InputError(f"{path}: no annotations")
    return references


def read_predictions(path: str, references: Mapping[str, Sequence[str]] | None = None) -> dict[str, str]:
    """The captions of a COCO results file ([{"image_id", "caption"}, ...]) keyed by str(image_id); with
    `references`, an image of the predictions that has none is an error too."""
    doc = _load_json(path)
    if not isinstance(doc, list):
        raise InputError(f"{path}: not a COCO results file (a list of {{'image_id', 'caption'}} objects)")
    predictions: dict[str, str] = {}
    for i, row in enumerate(doc):
        image, caption = _image_caption(path, f"result {i}", row)
        if image in predictions:
            raise InputError(f"{path}: image {image} has two captions (results {list(predictions).index(image)}, {i})")
        predictions[image] = caption
    if not predictions:
        raise InputError(f"{path}: no results")
    if references is not None:
        orphans = [image for image in predictions if not references.get(image)]
        if orphans:
            shown = ", ".join(orphans[:5]) + (f" and {len(orphans) - 5} more" if len(orphans) > 5 else "")
            raise InputError(f"{path}: {len(orphans)} captioned images have no reference captions: {shown}")
    return predictions
