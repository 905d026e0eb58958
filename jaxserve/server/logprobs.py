"""Engine `TokenLogprob`s -> the two OpenAI logprob shapes (legacy completions and chat).

Token strings are the single token decoded with special tokens kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from jaxserve.request import TokenLogprob
from jaxserve.server.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

if TYPE_CHECKING:
    from jaxserve.weights import Tokenizer


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(
    tokenizer: Tokenizer, entries: Sequence[TokenLogprob], text_offset: int = 0
) -> CompletionLogprobs:
    """`text_offset` is where the first entry's token starts in the choice's text."""
    result = CompletionLogprobs()
    for e in entries:
        token = token_text(tokenizer, e.token_id)
        result.tokens.append(token)
        result.token_logprobs.append(e.logprob)
        result.top_logprobs.append({token_text(tokenizer, t): lp for t, lp in e.top})
        result.text_offset.append(text_offset)
        text_offset += len(token)
    return result


def _top(tokenizer: Tokenizer, token_id: int, logprob: float) -> TopLogprob:
    token = token_text(tokenizer, token_id)
    return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8")))


def chat_logprobs(tokenizer: Tokenizer, entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    content = []
    for e in entries:
        chosen = _top(tokenizer, e.token_id, e.logprob)
        tops = [_top(tokenizer, t, lp) for t, lp in e.top]
        content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=tops))
    return ChatLogprobs(content=content)
