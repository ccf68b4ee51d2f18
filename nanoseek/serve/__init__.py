"""`nanoseek serve`: the OpenAI/DeepSeek-compatible server. The web framework is imported only when the
command runs, so the rest of the command line starts fast.

Each file imports only those listed after it:
* `app.py`: the FastAPI app (routes, authorization, error handlers, lifespan) and the command; its docstring
  documents the API's behaviour.
* `chat.py`, `completions.py`: the two generating endpoints, each with its stream; `tokens.py`: /tokenize and
  /detokenize.
* `streaming.py`: SSE framing, and collecting a non-streaming request's outputs.
* `server.py`: the state the handlers share: prompts, checks and sampling parameters (the engine's refusals
  become 400s there), usage and log-probabilities.
* `tools.py`: tool-call syntax by family, the grammar of forced calls, and the parsers of calls.
* `bridge.py`: the engine loop on its own thread, fed by the asyncio handlers, and its Prometheus metrics.
* `protocol.py`: the request bodies (pydantic) and `APIError`.
"""

from __future__ import annotations

import argparse

from ..flags import add_weight_flags

COMPAT_MODES = ("openai", "deepseek-r1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (with its tokenizer)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    parser.add_argument("--max-num-seqs", type=int, default=32, help="sequences in the running batch")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's, "
                        "at most 2048)")
    parser.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond the running batch "
                        "before new ones get 429")
    parser.add_argument("--max-request-bytes", type=int, default=8 * 2**20, help="larger request bodies get "
                        "413 (default 8 MiB)")
    parser.add_argument("--sse-ping-interval", type=float, default=15.0, help="seconds a stream waits for its "
                        "next event before it sends a keep-alive comment")
    parser.add_argument("--prefix-cache-tokens", type=int, default=65536, help="prompt tokens of latents kept "
                        "for reuse (0: off)")
    parser.add_argument("--compat", choices=COMPAT_MODES, default="openai",
                        help="deepseek-r1: the reasoner's parameter rules (see the module docstring)")
    parser.add_argument("--speculative", action="store_true", help="MTP self-speculative decoding (turns the "
                        "prefix cache off)")
    parser.add_argument("--device", default=None)
    add_weight_flags(parser)
    parser.add_argument("--log-level", default="warning")


def run(args: argparse.Namespace) -> int:
    from .app import run as serve

    return serve(args)
