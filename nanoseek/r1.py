"""The R1 format, in one place: the prompt layouts, the think block, the answer, and their parsing.

Every stage that writes or reads a reasoning reply goes through this module: the built-in corpus, SFT data,
GRPO rollouts and rewards, rejection sampling, evaluation, the chat command and the server.

Two layouts, the two recipes of the R1 paper (DeepSeek-R1, Nature 2025, §2.1 and §2.3):

* `chat`: the model's own chat template. nanoseek's opens the assistant turn with `<think>\\n` as
  DeepSeek-R1's does, so the model must reason, close the block and answer (training data writes
  `<answer>X</answer>`, as the zero layout does; the parser also takes "The answer is X." and `\\boxed{X}`).
* `zero`: R1-Zero's layout, `User: ...\\nAssistant:` and nothing prefilled. The reply is either
  `<think>\\n...\\n</think>\\n<answer>X</answer>` or `<answer>X</answer>`; the model chooses whether to
  reason, and the parser accepts both the same way (R1-Zero's template, paper Table 1, asks for both tags;
  here reasoning is optional so that RL can select it).

This module sits below the tokenizer (which takes its tags and chat template) and needs only a tokenizer's
`encode` and `apply_chat_template`, declared as `PromptTokenizer`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
# Single tokens that decoding keeps (not "special"), as in DeepSeek-R1's tokenizer: replies show their tags.
TAGS = [THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE]
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"

# The chat layout's template: the assistant turn opens a think block that the model closes before answering.
# Earlier assistant turns carry only their answers (DeepSeek drops reasoning from history).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}" + SYSTEM + "{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + THINK_OPEN + "\n{% endif %}"
)
ZERO_PROMPT = "User: {question}\nAssistant:"

MAX_ANSWER_CHARS = 200  # a longer "answer" is a list of guesses, not an answer
_LEADS = re.compile(r"^(so\s+)?(the\s+)?(final\s+)?answer(\s+is)?\s*[:=]?\s*", re.IGNORECASE)
_ANSWER_TAG = re.compile(re.escape(ANSWER_OPEN) + r"(.*?)" + re.escape(ANSWER_CLOSE), re.DOTALL)
_BOXED = re.compile(r"\\boxed\{(.*)\}")


def opens_think(prompt: str) -> bool:
    """Whether a rendered prompt ends inside an open think block (DeepSeek-R1's template prefills one)."""
    return prompt.rstrip().endswith(THINK_OPEN)


class PromptTokenizer(Protocol):
    """What the layouts need of a tokenizer (nanoseek's `Tokenizer` is one)."""

    chat_template: str | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str: ...


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    opened: bool  # the prompt ends inside an open think block


@dataclass(frozen=True)
class Reply:
    """A parsed reply: its reasoning (None for a direct answer) and its final answer (None when the format is
    broken: then the reply scores nothing, whatever it says)."""

    reasoning: str | None
    answer: str | None


class Layout:
    """A prompt layout with its reply format."""

    name: str

    def prompt_text(self, tokenizer: PromptTokenizer | None, question: str) -> tuple[str, bool]:
        """(the prompt's text, whether it ends inside an open think block)."""
        raise NotImplementedError

    def prompt(self, tokenizer: PromptTokenizer, question: str) -> Prompt:
        raise NotImplementedError

    def reply(self, answer: str, reasoning: str | None) -> str:
        """A reply as training data writes it (reasoning None: a direct answer)."""
        raise NotImplementedError

    def parse(self, text: str, opened: bool) -> Reply:
        raise NotImplementedError


class ChatLayout(Layout):
    name = "chat"

    def prompt_text(self, tokenizer: PromptTokenizer | None, question: str) -> tuple[str, bool]:
        if tokenizer is not None and tokenizer.chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": question}])
        else:  # no template (a bare checkpoint): the question, then an opened think block
            text = f"{question}\n{THINK_OPEN}\n"
        return text, opens_think(text)

    def prompt(self, tokenizer: PromptTokenizer, question: str) -> Prompt:
        text, opened = self.prompt_text(tokenizer, question)
        # a rendered template holds its special tokens (BOS) already; bare text gets them from the tokenizer
        return Prompt(tokenizer.encode(text, add_special_tokens=not tokenizer.chat_template), opened)

    def reply(self, answer: str, reasoning: str | None) -> str:
        if reasoning is None:
            raise ValueError("the chat layout's replies always reason (its template opens the think block)")
        return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"

    def parse(self, text: str, opened: bool) -> Reply:
        """Exactly one closed think block, then one short answer: `<answer>` tags, a `\\boxed{}`, or the text
        with its "The answer is" stripped. `opened`: the prompt opened the block, so the reply only closes it."""
        body = text if opened else text.lstrip()
        if not opened:
            if not body.startswith(THINK_OPEN):
                return Reply(None, None)
            body = body[len(THINK_OPEN):]
        if body.count(THINK_CLOSE) != 1 or THINK_OPEN in body:
            return Reply(None, None)
        reasoning, rest = body.split(THINK_CLOSE)
        return Reply(reasoning, _final_answer(rest))


class ZeroLayout(Layout):
    name = "zero"

    def prompt_text(self, tokenizer: PromptTokenizer | None, question: str) -> tuple[str, bool]:
        return ZERO_PROMPT.format(question=question), False

    def prompt(self, tokenizer: PromptTokenizer, question: str) -> Prompt:
        # BOS and all, the same tokens as the start of a pretraining document in this layout
        return Prompt(tokenizer.encode(ZERO_PROMPT.format(question=question)), False)

    def document(self, question: str, answer: str, reasoning: str | None) -> str:
        """A pretraining document in this layout: the prompt, then the reply (the corpus writes these)."""
        return ZERO_PROMPT.format(question=question) + self.reply(answer, reasoning)

    def reply(self, answer: str, reasoning: str | None) -> str:
        think = f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n" if reasoning is not None else ""
        return f"{think}{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"

    def parse(self, text: str, opened: bool = False) -> Reply:
        """An optional think block, then exactly one `<answer>...</answer>` and nothing after it. A direct and
        a reasoning reply parse alike, so no reward built on this parser pays for reasoning as such."""
        body, reasoning = text.strip(), None
        if body.startswith(THINK_OPEN):
            inner, closed, rest = body[len(THINK_OPEN):].partition(THINK_CLOSE)
            if not closed or THINK_OPEN in inner:
                return Reply(inner, None)
            reasoning, body = inner, rest.strip()
        if not (body.startswith(ANSWER_OPEN) and body.endswith(ANSWER_CLOSE)):
            return Reply(reasoning, None)
        answer = body[len(ANSWER_OPEN):-len(ANSWER_CLOSE)]
        if any(tag in answer for tag in TAGS):
            return Reply(reasoning, None)
        answer = answer.strip()
        ok = answer and len(answer) <= MAX_ANSWER_CHARS and "\n" not in answer
        return Reply(reasoning, answer if ok else None)


LAYOUTS: dict[str, Layout] = {"chat": ChatLayout(), "zero": ZeroLayout()}


def conversation_prompt(tokenizer: PromptTokenizer, messages: list[dict[str, str]], **template_kwargs: Any) -> Prompt:
    """A conversation as the next reply's prompt: the tokenizer's chat template (given `template_kwargs`) or,
    without one, the zero layout's turns (`User: ...\nAssistant: ...`), nothing prefilled."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs)
        return Prompt(tokenizer.encode(text, add_special_tokens=False), opens_think(text))
    turns = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages]
    return Prompt(tokenizer.encode("\n".join(turns) + "\nAssistant:"), False)


def layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise ValueError(f"--template {name!r}: one of {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def _final_answer(text: str) -> str | None:
    """The answer in the text after a think block, or None when there is no single short one."""
    text = text.strip()
    tagged = _ANSWER_TAG.findall(text)
    if len(tagged) > 1:
        return None
    if tagged:
        text = tagged[0].strip()
    boxed = _BOXED.findall(text)
    if boxed:
        text = boxed[-1].strip()
    text = _LEADS.sub("", text).strip().rstrip(".").strip()
    if not text or len(text) > MAX_ANSWER_CHARS or "\n" in text:
        return None
    return text


# ---- streamed replies (the chat command and the server) ----------------------------------------------------
REASONING, CONTENT = "reasoning", "content"


class ReasoningParser:
    """Splits a streamed reply into its reasoning (`<think> ... </think>`) and its answer. Text arrives in
    arbitrary pieces, so a tag may be cut between two of them: a piece that could be the start of a tag is
    held back until the next piece decides it."""

    def __init__(self, in_reasoning: bool = False):
        """`in_reasoning`: the prompt already opened the think block (the chat layout's template)."""
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
            keep = partial_tag_length(self.buffer, THINK_CLOSE)
            pieces.append((REASONING, self.buffer[: len(self.buffer) - keep]))
            self.buffer = self.buffer[len(self.buffer) - keep:]
            break
        return [(kind, text) for kind, text in pieces if text]

    def finish(self) -> list[tuple[str, str]]:
        """The held-back rest, once the stream has ended."""
        kind = REASONING if self.state == REASONING else CONTENT
        rest, self.buffer = self.buffer, ""
        return [(kind, rest)] if rest else []


def split_reply(text: str, in_reasoning: bool) -> tuple[str | None, str]:
    """A whole reply as (its reasoning, or None when it has no think block; its answer), as the stream splits it."""
    parser = ReasoningParser(in_reasoning)
    pieces = parser.feed(text) + parser.finish()
    content = "".join(piece for kind, piece in pieces if kind == CONTENT)
    if not parser.had_reasoning:
        return None, content
    return "".join(piece for kind, piece in pieces if kind != CONTENT), content


def partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0
