"""POST /tokenize and /detokenize (vLLM's endpoints beside the OpenAI API): token ids of a prompt or of a
conversation as the chat endpoint would render it, and text of token ids."""

from __future__ import annotations

import asyncio
from typing import Any

from .protocol import APIError, ChatRequest, DetokenizeRequest, TokenizeRequest
from .server import Server


async def tokenize(server: Server, body: TokenizeRequest) -> dict[str, Any]:
    server.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "prompt: send either prompt or messages", "prompt")
    if body.prompt is not None:
        ids = await asyncio.to_thread(server.tokenizer.encode, body.prompt, body.add_special_tokens)
    else:
        chat = ChatRequest(model=server.config.served_model_name, messages=body.messages)
        ids, _ = await asyncio.to_thread(server.chat_prompt, chat, body.add_generation_prompt)
    return {"count": len(ids), "max_model_len": server.llm.max_model_len, "tokens": ids}


async def detokenize(server: Server, body: DetokenizeRequest) -> dict[str, Any]:
    server.check_model(body.model)
    vocab = server.llm.model.config.vocab_size
    outside = [(i, t) for i, t in enumerate(body.tokens) if t >= vocab]
    if outside:
        i, token = outside[0]
        raise APIError(400, f"tokens.{i}: token id {token} is outside the vocabulary [0, {vocab})", f"tokens.{i}")
    return {"prompt": await asyncio.to_thread(server.tokenizer.decode, body.tokens, False)}
