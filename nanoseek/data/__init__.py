"""Training data: local sources, token shards, packed and chat sequences (the built-in corpus is in
`nanoseek.tasks.corpus`)."""

from .chat import ChatSequences, read_conversations, tokenize_conversation
from .shards import Batch, PackedSequences, TokenStream, build_shards, load_manifest
from .sources import DataError, read_documents, resolve

__all__ = ["Batch", "ChatSequences", "DataError", "PackedSequences", "TokenStream", "build_shards",
           "load_manifest", "read_conversations", "read_documents", "resolve",
           "tokenize_conversation"]
