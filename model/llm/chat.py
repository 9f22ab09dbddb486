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


def _segments(tokenizer: TextTokenizer, turns: Sequence[Turn]) -> list[tuple[list[int], int]]:
    """Per turn: BOS? + prompt + answer + EOS as tokens, and how many of them are the prompt's."""
    prompts = [turn_prompt(q, i == 0) for i, (q, _) in enumerate(turns)]
    out = []
    for i, (prompt, (_, answer)) in enumerate(zip(prompts, turns, strict=True)):
        n_prompt = len(tokenizer.encode(prompt, bos=i == 0, eos=False))
        out.append((tokenizer.encode(prompt + answer, bos=i == 0, eos=True), n_prompt))
    return out


def encode_conversation(tokenizer: TextTokenizer, turns: Sequence[Turn], max_words: int) -> tuple[list[int], list[int]]:
    """Tokens of a whole conversation and labels that score every answer (and its EOS), prompts set to IGNORE.

    Truncation keeps whole turns: the leading turns that fit in `max_words` are kept and the rest dropped. A first
    turn longer than `max_words` on its own is cut as a single-turn sample is (`prompts.encode_example`), so a
    one-turn conversation encodes exactly as today's single-turn sample.
    """
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    return _join(_segments(tokenizer, turns), max_words)


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
    """`encode_conversation` of each conversation, in four batched tokenizer calls (first and later turns, each
    prompt alone and with its answer)."""
    if not all(conversations):
        raise ValueError("a conversation needs at least one turn")
    where = [(c, i) for c, turns in enumerate(conversations) for i in range(len(turns))]
    prompts = {at: turn_prompt(conversations[at[0]][at[1]][0], at[1] == 0) for at in where}
    segments: dict[tuple[int, int], tuple[list[int], int]] = {}
    for first in (True, False):
        group = [at for at in where if (at[1] == 0) == first]
        if not group:
            continue
        alone = tokenizer.encode_batch([prompts[at] for at in group], bos=first, eos=False)
        whole = tokenizer.encode_batch([prompts[at] + conversations[at[0]][at[1]][1] for at in group], first, True)
        segments |= {at: (ids, len(p)) for at, ids, p in zip(group, whole, alone, strict=True)}
    return [_join([segments[c, i] for i in range(len(turns))], max_words) for c, turns in enumerate(conversations)]


def chat_prompt(
    tokenizer: TextTokenizer, history: Sequence[Turn], question: str, budget: int | None = None
) -> list[int]:
    """Token ids to generate the answer to `question` after `history`, rendered as `encode_conversation` does.

    With a `budget` (the most prompt tokens allowed), the oldest turns are dropped until the prompt fits; the
    turn that becomes first is rendered as a first turn (system line and BOS). Raises ConversationTooLong when
    the question alone does not fit.
    """
    history = list(history)
    while True:
        ids: list[int] = []
        for segment, _ in _segments(tokenizer, history):
            ids += segment
        ids += tokenizer.encode(turn_prompt(question, not history), bos=not history, eos=False)
        if budget is None or len(ids) <= budget:
            return ids
        if not history:
            raise ConversationTooLong(f"the question alone is {len(ids)} tokens, over the budget of {budget}")
        history = history[1:]
