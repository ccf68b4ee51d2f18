"""Training data: local sources, the built-in corpus, token shards, packed sequences."""

from .chat import ChatSequences, read_conversations, tokenize_conversation
from .corpus import generate_corpus
from .shards import Batch, PackedSequences, TokenStream, build_shards, load_manifest
from .sources import DataError, read_documents, resolve

__all__ = ["Batch", "ChatSequences", "DataError", "PackedSequences", "TokenStream", "build_shards", "generate_corpus",
           "load_manifest", "read_conversations", "read_documents", "resolve",
           "tokenize_conversation"]
