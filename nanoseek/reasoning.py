"""Split a streamed R1-style reply into its reasoning (`<think> ... </think>`) and its answer.

Text arrives in arbitrary pieces, so a tag may be cut between two of them: a piece that could be the start of
a tag is held back until the next piece decides it.
"""

from __future__ import annotations

from .tokenizer import THINK_CLOSE, THINK_OPEN

REASONING, CONTENT = "reasoning", "content"


class ReasoningParser:
    def __init__(self, in_reasoning: bool = False):
        """`in_reasoning`: the prompt already opened the think block (R1's template ends with `<think>\\n`)."""
        self.state = REASONING if in_reasoning else "start"
        self.buffer = ""
        self.had_reasoning = in_reasoning

    def feed(self, text: str) -> list[tuple[str, str]]:
        """Add text; return the (kind, text) pieces it settles, kind being "reasoning" or "content"."""
        self.buffer += text
        pieces: list[tuple[str, str]] = []
        while self.buffer:
            if self.state == "start":
                head = self.buffer.lstrip()
                if head.startswith(THINK_OPEN):
                    self.buffer, self.state, self.had_reasoning = head[len(THINK_OPEN):], REASONING, True
                    continue
                if THINK_OPEN.startswith(head):
                    break  # maybe a tag still arriving
                self.state = CONTENT
            if self.state == CONTENT:
                pieces.append((CONTENT, self.buffer))
                self.buffer = ""
                break
            at = self.buffer.find(THINK_CLOSE)
            if at >= 0:
                pieces.append((REASONING, self.buffer[:at]))
                self.buffer, self.state = self.buffer[at + len(THINK_CLOSE):], CONTENT
                continue
            keep = _partial_tag_length(self.buffer, THINK_CLOSE)
            pieces.append((REASONING, self.buffer[: len(self.buffer) - keep]))
            self.buffer = self.buffer[len(self.buffer) - keep:]
            break
        return [(kind, text) for kind, text in pieces if text]

    def finish(self) -> list[tuple[str, str]]:
        """The held-back rest, once the stream has ended."""
        kind = REASONING if self.state == REASONING else CONTENT
        rest, self.buffer = self.buffer, ""
        return [(kind, rest)] if rest else []


def _partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0
