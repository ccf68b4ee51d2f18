"""`nanoseek pretrain`: tokenizer, token shards and a model, then the training loop."""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import load_model, read_config
from ..config import PRESETS, DeepSeekV32Config, DenseConfig, ModelConfig, extended_context, preset
from ..data import PackedSequences, TokenStream, build_shards, load_manifest, read_documents, resolve
from ..data.shards import tokenizer_fingerprint
from ..model import add_indexer, build_model, with_config
from ..tasks import MAX_DIFFICULTY, TASKS, parse_tasks
from ..tasks.corpus import CorpusMix, generate_corpus
from ..tasks.passkey import Haystack, generate_passkey_corpus, parse_chars
from ..tokenizer import MIN_BPE_VOCAB, Tokenizer, train_tokenizer
from .config import TrainConfig, add_run_arguments, add_train_arguments, train_config_from
from .loop import Trainer, run_distributed

TOKENIZER_SAMPLE_DOCUMENTS = 20_000
DEFAULT_DOC_CHARS = "2000,24000"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--preset", choices=list(PRESETS), default=None, help="model config (default: nano)")
    model.add_argument("--model-config", help="a config.json for the model (either family)")
    model.add_argument("--init", help="continue from this checkpoint's weights and tokenizer on this run's data, "
                       "with a fresh optimizer and schedule (e.g. the decay phase of a WSD schedule on a new mix)")
    parser.add_argument("--data", nargs="+", help="text/JSONL/Parquet files, directories or globs "
                        "(default: the built-in generated corpus)")
    parser.add_argument("--vocab-size", type=int, help="override the config's vocab_size (and the tokenizer's)")
    parser.add_argument("--field", default="text", help="JSONL field / Parquet column holding the text")
    parser.add_argument("--corpus", choices=("tasks", "passkey"), default="tasks", help="the built-in corpus: "
                        "task documents, or long documents of them with a pass key planted far back and asked for "
                        "at the end (long-context training)")
    parser.add_argument("--corpus-docs", type=int, default=20_000, help="documents of the built-in corpus")
    parser.add_argument("--corpus-doc-chars", default=DEFAULT_DOC_CHARS, help="passkey corpus: each document's length "
                        "in characters, drawn uniformly from MIN,MAX")
    parser.add_argument("--corpus-tasks", default=",".join(TASKS), help="tasks of the built-in corpus")
    parser.add_argument("--corpus-min-difficulty", type=int, default=1, help="easiest problems of the corpus")
    parser.add_argument("--corpus-max-difficulty", type=int, default=3, help="hardest problems of the corpus")
    parser.add_argument("--corpus-template-share", type=float, default=CorpusMix.template_share,
                        help="share of corpus documents in the zero prompt layout (User: ... Assistant: reply)")
    parser.add_argument("--corpus-think-share", type=float, default=CorpusMix.think_share,
                        help="share of those replies that reason in a think block (the others answer directly)")
    add_run_arguments(parser, "runs/pretrain")
    parser.add_argument("--tokenizer", help="directory with tokenizer.json (default: train one on the data)")
    parser.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp",
                        help="under torchrun: DistributedDataParallel or FSDP2 fully_shard")
    parser.add_argument("--export-every", type=int, default=0,
                        help="FSDP: every N steps a checkpoint that holds the full HF directory beside the per-rank "
                        "shards (0: only the last; the other modes always hold it)")
    context = parser.add_argument_group("context extension (YaRN)")
    context.add_argument("--extend-context", type=int, help="with --init: stretch the model's RoPE with YaRN to this "
                         "many positions (V3 paper §4.3: s = new / trained length, beta 32 and 1, mscale 1)")
    context.add_argument("--trained-context", type=int, help="the length the --init model was trained at (default: "
                         "its YaRN original length, else its max_position_embeddings)")
    dsa = parser.add_argument_group("DeepSeek Sparse Attention (V3.2)")
    dsa.add_argument("--index-topk", type=int, help="make the model DeepSeek-V3.2: a lightning indexer in every "
                     "layer, attention over its top-k keys (a DeepSeek-V3 --init checkpoint keeps its weights and "
                     "gets a new indexer; default k when another --index-* flag is given: 2048)")
    dsa.add_argument("--index-n-heads", type=int, help="the indexer's heads (default: a ninth of the attention's "
                     "work per key, V3.2's proportion)")
    dsa.add_argument("--index-head-dim", type=int, help="the indexer's head width (default: twice the RoPE width, "
                     "as V3.2)")
    dsa.add_argument("--dsa-steps", type=int, help="sparse-training steps after the --dsa-warmup-steps warm-up: "
                     "sets --max-steps to their sum (V3.2-Exp report §2.1.1's two stages)")
    add_train_arguments(parser)


def _index_sizes(args: argparse.Namespace) -> dict[str, int]:
    return {key: getattr(args, key) for key in ("index_topk", "index_n_heads", "index_head_dim")
            if getattr(args, key) is not None}


def _with_indexer(config: ModelConfig | DenseConfig, args: argparse.Namespace) -> ModelConfig | DenseConfig:
    """The config made DeepSeek-V3.2 when an --index-* flag asks for it."""
    index = _index_sizes(args)
    if not index:
        return config
    if isinstance(config, DeepSeekV32Config):
        raise ValueError(f"--{next(iter(index)).replace('_', '-')}: the model has an indexer already "
                         f"(index_topk {config.index_topk}, index_n_heads {config.index_n_heads}, index_head_dim "
                         f"{config.index_head_dim})")
    if type(config) is not ModelConfig:
        raise ValueError(f"--{next(iter(index)).replace('_', '-')}: the indexer is added to a DeepSeek-V3 model, not "
                         f"to {config.architecture}")
    return DeepSeekV32Config.from_v3(config, **index)


def _extended(config: ModelConfig | DenseConfig, args: argparse.Namespace) -> ModelConfig | DenseConfig:
    """The config with its context stretched by YaRN when --extend-context asks for it."""
    if not args.extend_context:
        if args.trained_context:
            raise ValueError("--trained-context without --extend-context: nothing to extend")
        return config
    if isinstance(config, DenseConfig):
        raise ValueError(f"--extend-context: YaRN extension is for the DeepSeek family, not {config.architecture}")
    return extended_context(config, args.extend_context, args.trained_context)


def _model_config(args: argparse.Namespace) -> ModelConfig | DenseConfig:
    """A preset, or a config.json of either family (a dense one pretrains a student for distillation), or the
    config of the --init checkpoint."""
    if args.init:
        if args.vocab_size:
            raise ValueError("--vocab-size with --init: the checkpoint fixes the vocabulary")
        return _with_indexer(_extended(read_config(Path(args.init) / "config.json"), args), args)
    if args.extend_context or args.trained_context:
        raise ValueError("--extend-context/--trained-context extend an --init checkpoint; a new model takes its "
                         "length from its config (max_position_embeddings, rope_scaling)")
    config = _with_indexer(read_config(Path(args.model_config)) if args.model_config else
                           preset(args.preset or "nano"), args)
    if args.vocab_size:
        return config.replace(vocab_size=args.vocab_size)
    if not args.tokenizer and config.vocab_size < MIN_BPE_VOCAB:  # the tiny test preset has 128 rows
        fitted = -(-MIN_BPE_VOCAB // 64) * 64
        print(f"note: vocab_size {config.vocab_size} is too small for a byte-level BPE tokenizer (at least "
              f"{MIN_BPE_VOCAB}); using {fitted} (--vocab-size sets it)", flush=True)
        return config.replace(vocab_size=fitted)
    return config


def _documents(args: argparse.Namespace):
    """(documents iterator factory, a string naming the source for the shard manifest)."""
    if not args.data:
        tasks = parse_tasks(args.corpus_tasks)
        if not 1 <= args.corpus_min_difficulty <= args.corpus_max_difficulty <= MAX_DIFFICULTY:
            raise ValueError(f"--corpus-min-difficulty = {args.corpus_min_difficulty}, --corpus-max-difficulty = "
                             f"{args.corpus_max_difficulty}: need 1 <= min <= max <= {MAX_DIFFICULTY}")
        mix = CorpusMix(args.corpus_template_share, args.corpus_think_share)
        source = (f"builtin-corpus:documents={args.corpus_docs},seed={args.seed},tasks={','.join(tasks)},"
                  f"difficulties={args.corpus_min_difficulty}-{args.corpus_max_difficulty},"
                  f"template_share={mix.template_share},think_share={mix.think_share}")
        if args.corpus != "passkey" and args.corpus_doc_chars != DEFAULT_DOC_CHARS:
            raise ValueError("--corpus-doc-chars sizes the passkey corpus's documents: give --corpus passkey")
        if args.corpus == "passkey":
            chars = parse_chars(args.corpus_doc_chars)
            kind = Haystack(tuple(tasks), (args.corpus_min_difficulty, args.corpus_max_difficulty), mix)
            return (lambda: generate_passkey_corpus(args.corpus_docs, args.seed, chars, kind)), \
                f"{source},passkey_chars={chars[0]}-{chars[1]}"
        return (lambda: generate_corpus(args.corpus_docs, args.seed, args.corpus_max_difficulty, tasks, mix,
                                        args.corpus_min_difficulty)), \
            source
    if args.corpus != "tasks":
        raise ValueError(f"--corpus {args.corpus} with --data: the built-in corpus is used only without --data")
    files = resolve(args.data)
    source = json.dumps([[str(f), f.stat().st_size, int(f.stat().st_mtime)] for f in files] + [args.field])
    return (lambda: read_documents(files, args.field)), source


def _tokenizer(args: argparse.Namespace, out: Path, config: ModelConfig, documents) -> Tokenizer:
    """The given tokenizer, the run's own (saved once its data was tokenised), or a new one trained on the data."""
    if args.tokenizer or args.init:
        tokenizer = Tokenizer.from_dir(args.tokenizer or args.init)
        if tokenizer is None:
            raise ValueError(f"{'--tokenizer ' + args.tokenizer if args.tokenizer else '--init ' + args.init}: no "
                             "tokenizer.json there")
    elif (out / "tokenizer" / "tokenizer.json").exists():
        tokenizer = Tokenizer.from_dir(out / "tokenizer")
    else:
        tokenizer = train_tokenizer(itertools.islice(documents(), TOKENIZER_SAMPLE_DOCUMENTS), config.vocab_size)
        enough = -(-tokenizer.vocab_size // 64) * 64
        if enough < config.vocab_size:  # the data ran out of merges: the unused rows still cost FLOPs
            print(f"note: the tokenizer learned {tokenizer.vocab_size:,} tokens from the data, so "
                  f"{config.vocab_size - tokenizer.vocab_size:,} of the model's {config.vocab_size:,} embedding and "
                  f"output rows will never be used; --vocab-size {enough} avoids that", flush=True)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{config.vocab_size}; pass --vocab-size {-(-tokenizer.vocab_size // 64) * 64}")
    return tokenizer


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.dsa_steps is not None:
        if args.dsa_steps < 0:
            raise ValueError(f"--dsa-steps = {args.dsa_steps}: must be >= 0")
        total = args.dsa_warmup_steps + args.dsa_steps
        if total < 1:
            raise ValueError(f"--dsa-warmup-steps {args.dsa_warmup_steps} + --dsa-steps {args.dsa_steps}: no step "
                             "to run")
        if args.max_steps not in (total, TrainConfig.max_steps):
            raise ValueError(f"--dsa-steps {args.dsa_steps} with --max-steps {args.max_steps}: --dsa-steps sets "
                             f"the steps to --dsa-warmup-steps + --dsa-steps = {total}; give one of the two")
        args.max_steps = total
    train_config = train_config_from(args)
    config = _model_config(args)
    if isinstance(config, DeepSeekV32Config) and train_config.seq_len <= config.index_topk:
        print(f"note: --seq-len {train_config.seq_len} is within index_topk {config.index_topk}: every query sees "
              "at most k keys, so attention stays dense and the sparse stage trains as the warm-up does", flush=True)
    return run_distributed(_run, args, out, train_config, config)


def _run(args: argparse.Namespace, out: Path, train_config: TrainConfig, config: ModelConfig | DenseConfig, rank: int,
         device: torch.device) -> int:
    documents, source = _documents(args)
    shards = out / "data"
    if rank == 0:  # one process prepares tokenizer and shards; the others wait and read them
        out.mkdir(parents=True, exist_ok=True)
        tokenizer = _tokenizer(args, out, config, documents)
        manifest = load_manifest(shards)
        if manifest is None or manifest["source"] != source or \
                manifest["tokenizer"] != tokenizer_fingerprint(tokenizer):
            manifest = build_shards(documents(), tokenizer, shards, source)
        if not (out / "tokenizer" / "tokenizer.json").exists():
            tokenizer.save(out / "tokenizer")  # only now: the data it was trained on proved usable
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        tokenizer = _tokenizer(args, out, config, documents)
        manifest = load_manifest(shards)
    data = PackedSequences(TokenStream(shards, manifest), train_config.seq_len, train_config.seed,
                           source=f"{manifest['source']}|{manifest['tokenizer']}")
    torch.manual_seed(train_config.seed)
    if args.init:
        model = load_model(args.init, device=device, dtype=torch.float32)
        if args.extend_context:  # the same weights under the stretched RoPE
            model = with_config(model, _extended(model.config, args))
        if isinstance(config, DeepSeekV32Config) and not isinstance(model.config, DeepSeekV32Config):
            model = add_indexer(model, **_index_sizes(args))  # V3 -> V3.2: the same weights, new indexers
    else:
        with torch.device(device):
            model = build_model(config)
    model.generation_config = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    trainer = Trainer(model, tokenizer, data, train_config, out, resume=args.resume, parallel=args.parallel,
                      export_every=args.export_every)
    if rank != 0:
        trainer.run()
        return 0
    what = args.preset or args.model_config or (f"from {args.init}" if args.init else "nano")
    print(f"pretraining {what}: {manifest['tokens']:,} tokens in "
          f"{manifest['documents']:,} documents, {trainer.config.max_steps} steps of "
          f"{train_config.batch_size * train_config.grad_accum * trainer.world} x {train_config.seq_len} tokens, on "
          f"{device}" + (f" x {trainer.world} ({trainer.parallel})" if trainer.world > 1 else ""))
    started, first_step = time.perf_counter(), trainer.step
    last = trainer.run()
    tokens = (trainer.step - first_step) * train_config.batch_size * train_config.grad_accum * train_config.seq_len \
        * trainer.world
    print(f"done: loss {last.get('loss', float('nan')):.3f}, validation loss {last.get('val_loss', float('nan')):.3f};"
          f" checkpoint {out / 'latest'}")
    print(trainer.cost_line(tokens, time.perf_counter() - started))
    return 0
