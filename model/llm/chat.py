"""Whole conversations as tokens: one template for multi-turn training (labels on every answer) and for chat."""

from __future__ import annotations

from collections.abc import Sequence

from model.llm.model import IGNORE
from model.llm.prompts import format_prompt
from model.llm.tokenizer import TextTokenizer

Turn = tuple[str, str]  # (the user's instruction, the assistant's answer)
LATER_TURN = "### Instruction:\n{instruction}\n\n### Response:"


class ConversationTooLong(ValueError):
    """The newest question alone does not fit in the token budget."""


def turn_prompt(instruction: str, first: bool) -> str:
    """The prompt text of one turn.

    The first turn is the Alpaca prompt with its system line (`format_prompt`), so a one-turn conversation is
    exactly today's single-turn sample; later turns carry the instruction and response headers only. Each turn's
    answer ends with EOS, which separates it from the next turn.
    """
    return format_prompt(instruction) if first else LATER_TURN.format(instruction=instruction)


Segment = tuple[list[int], int]  # BOS? + prompt + answer + EOS as tokens, and how many of them are the prompt's


def _segments(tokenizer: TextTokenizer, turns: Sequence[tuple[Turn, bool]]) -> list[Segment]:
    """The segment of each (turn, rendered as a first turn?), in two batched tokenizer calls."""
    prompts = [turn_prompt(q, first) for (q, _), first in turns]
    segments = []
    for first in (True, False):
        rows = [i for i, (_, f) in enumerate(turns) if f == first]
        if rows:
            alone = tokenizer.encode_batch([prompts[i] for i in rows], bos=first, eos=False)
            whole = tokenizer.encode_batch([prompts[i] + turns[i][0][1] for i in rows], bos=first, eos=True)
            segments += [(i, (ids, len(p))) for i, ids, p in zip(rows, whole, alone, strict=True)]
    return [seg for _, seg in sorted(segments, key=lambda x: x[0])]


def encode_conversation(tokenizer: TextTokenizer, turns: Sequence[Turn], max_words: int) -> tuple[list[int], list[int]]:
    """Tokens of a whole conversation and labels that score every answer (and its EOS), prompts set to IGNORE.

    Truncation keeps whole turns: the leading turns that fit in `max_words` are kept and the rest dropped. A first
    turn longer than `max_words` on its own is cut as a single-turn sample is (`prompts.encode_example`), so a
    one-turn conversation encodes exactly as today's single-turn sample.
    """
    return encode_conversations(tokenizer, [turns], max_words)[0]


def _join(segments: Sequence[tuple[list[int], int]], max_words: int) -> tuple[list[int], list[int]]:
    """The leading whole segments that fit in `max_words` (a first one that does not, cut), and their labels."""
    tokens: list[int] = []
    labels: list[int] = []
    for i, (segment, n_prompt) in enumerate(segments):
        if len(tokens) + len(segment) > max_words:
            if i == 0:
                segment = segment[:max_words]
                tokens, labels = segment, [IGNORE] * min(n_prompt, len(segment)) + segment[n_prompt:]
            break
        tokens += segment
        labels += [IGNORE] * n_prompt + segment[n_prompt:]
    return tokens, labels


def encode_conversations(
    tokenizer: TextTokenizer, conversations: Sequence[Sequence[Turn]], max_words: int
) -> list[tuple[list[int], list[int]]]:
    """`encode_conversation` of each conversation, their turns encoded together in a few batched tokenizer calls."""
    if not all(conversations):
        raise ValueError("a conversation needs at least one turn")
    segments = iter(_segments(tokenizer, [(turn, i == 0) for turns in conversations for i, turn in enumerate(turns)]))
    return [_join([next(segments) for _ in turns], max_words) for turns in conversations]


def fit_conversation(
    tokenizer: TextTokenizer, history: Sequence[Turn], question: str, budget: int | None = None
) -> tuple[list[int], int]:
    """`chat_prompt`'s ids, and how many of the oldest turns were dropped to fit in `budget`."""
    later = _segments(tokenizer, [(turn, False) for turn in history[1:]])  # turns after the first, kept as they are
    for dropped in range(len(history) + 1):
        opening = _segments(tokenizer, [(history[dropped], True)]) if dropped < len(history) else []
        ids = [t for seg, _ in opening + later[dropped:] for t in seg]
        ids += tokenizer.encode(turn_prompt(question, dropped == len(history)), bos=dropped == len(history), eos=False)
        if budget is None or len(ids) <= budget:
            return ids, dropped
    raise ConversationTooLong(f"the question alone is {len(ids)} tokens, over the budget of {budget}")


def chat_prompt(
    tokenizer: TextTokenizer, history: Sequence[Turn], question: str, budget: int | None = None
) -> list[int]:
    """Token ids to generate the answer to `question` after `history`, rendered as `encode_conversation` does.

    With a `budget` (the most prompt tokens allowed), the oldest turns are dropped until the prompt fits; the
    turn that becomes first is rendered as a first turn (system line and BOS). Raises ConversationTooLong when
    the question alone does not fit.
    """
    return fit_conversation(tokenizer, history, question, budget)[0]
