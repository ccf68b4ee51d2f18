"""ModelRunner: runs the model over the latent caches for batches of sequences and samples their tokens.

Every sequence owns a cache slot (`c_kv` and `k_pe` per layer and position, nothing else). Prefill runs the
prompts of newly admitted sequences as one padded batch in the expanded MLA path; decode runs one token per
running sequence in the absorbed path. With MTP speculation (V3 paper §2.2, §5.4.3) each decode step verifies the MTP
module's draft together with the last token in one two-token forward, then drafts again.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model import LanguageModel
from .prefix_cache import PrefixCache
from .sampler import DRAFT, SamplingBatch, process, sample, token_logprobs, verify
from .sequence import Sequence
from .structured import Grammars

PROMPT_LOGIT_ROWS = 256  # positions whose logits are held at once when scoring a prompt


class ModelRunner:
    def __init__(self, model: LanguageModel, num_slots: int, max_model_len: int, speculative: bool = False,
                 prefix_cache_tokens: int = 0, index_dtype: torch.dtype | None = None):
        self.model = model
        self.device = model.device
        self.vocab = model.config.vocab_size
        # +2: a speculative step writes up to two positions past the newest token
        self.cache = model.new_cache(num_slots, max_model_len + 2, index_dtype=index_dtype)
        self.speculative = speculative
        # the MTP draft after prefill needs every prompt position's hidden state, so no prefix reuse with it
        self.prefix_cache = PrefixCache(self.cache, max_tokens=prefix_cache_tokens) if prefix_cache_tokens else None
        self.mtp_cache = model.new_cache(num_slots, max_model_len + 2, mtp=True, index_dtype=index_dtype) \
            if speculative else None
        self.drafts = torch.zeros(num_slots, dtype=torch.long, device=self.device)
        self.draft_probs: Tensor | None = None  # [slots, V] the draft distribution, for sampled speculation
        self.counts: Tensor | None = None  # [slots, V] generated-token counts, for penalties
        self.seen: Tensor | None = None  # [slots, V] tokens in prompt or output, for the repetition penalty
        self.grammars: Grammars | None = None  # the LLM's, for sequences with structured outputs

    def _tensor(self, values, dtype=torch.long) -> Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    # ---- prefill -----------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> None:
        """Run the prompts (once per request: `n` siblings copy the leader's slot) and sample a first token.
        With a prefix cache, each prompt's cached start is copied into its slot and only the rest is run."""
        leaders: dict[str, int] = {}
        for i, seq in enumerate(seqs):
            leaders.setdefault(seq.request_id, i)
        heads = [seqs[i] for i in leaders.values()]
        # a prompt to be scored runs whole: the prefix cache would skip the positions it scores
        starts = [self.prefix_cache.load(s.prompt_ids, self.cache, s.slot)
                  if self.prefix_cache and s.params.prompt_logprobs is None else 0 for s in heads]
        lengths = [len(s.prompt_ids) - start for s, start in zip(heads, starts, strict=True)]
        steps = max(lengths)
        ids = torch.zeros(len(heads), steps, dtype=torch.long)
        for row, (seq, start) in enumerate(zip(heads, starts, strict=True)):
            ids[row, : lengths[row]] = torch.tensor(seq.prompt_ids[start:])
        ids = ids.to(self.device)
        # padding runs at the positions after each prompt (overwritten before they are read), kept in the cache
        positions = (self._tensor(starts)[:, None] + torch.arange(steps, device=self.device)).clamp_max(
            self.cache.max_len - 1)
        last = self._tensor(lengths) - 1
        out = self.model.run(ids, positions, self.cache, self._tensor([s.slot for s in heads]),
                             logits_index=last[:, None])
        for row, (seq, start) in enumerate(zip(heads, starts, strict=True)):
            seq.cached_tokens = start
            if seq.params.prompt_logprobs is not None:
                seq.prompt_logprobs = self._prompt_logprobs(out.hidden[row, : lengths[row] - 1], seq)
            if self.prefix_cache:
                self.prefix_cache.store(seq.prompt_ids, self.cache, seq.slot)
        head_row = {s.request_id: row for row, s in enumerate(heads)}
        rows = self._tensor([head_row[s.request_id] for s in seqs])
        for seq in seqs:  # n > 1: the siblings share the prompt's latents (a copy of a few KiB per token)
            leader = heads[head_row[seq.request_id]]
            if seq is not leader:
                seq.cached_tokens = leader.cached_tokens
                self.cache.copy(seq.slot, leader.slot, len(seq.prompt_ids))
        self._reset_penalty_state(seqs)
        logits = out.logits[:, 0][rows]
        batch = self._batch(seqs)
        tokens = sample(self._process(self._constrain(logits, seqs), batch, seqs), batch)
        self._append(seqs, [tokens[:, None]], [logits], torch.zeros_like(tokens))
        if self.speculative:
            self._draft_after_prefill(seqs, ids[rows], out.hidden[rows], last[rows], tokens, batch)

    def _prompt_logprobs(self, hidden: Tensor, seq: Sequence) -> list[dict[int, float] | None]:
        """Each prompt token's log-probability given the tokens before it, with the `prompt_logprobs` most
        likely there (None for the first token, which nothing predicts), from the final hidden states of
        positions 0..L-2. The head runs over PROMPT_LOGIT_ROWS positions at a time: a whole prompt's logits
        would be L x V floats (2 GiB for 4K tokens of DeepSeek's 129K vocabulary)."""
        targets, top = self._tensor(seq.prompt_ids[1:]), seq.params.prompt_logprobs
        entries: list[dict[int, float] | None] = [None]
        for start in range(0, hidden.shape[0], PROMPT_LOGIT_ROWS):
            rows = slice(start, start + PROMPT_LOGIT_ROWS)
            chosen, values, ids = (x.tolist() for x in token_logprobs(self.model.lm_head(hidden[rows]),
                                                                        targets[rows], top))
            for token, logprob, top_values, top_ids in zip(targets[rows].tolist(), chosen, values, ids,
                                                             strict=True):
                entries.append({token: logprob, **dict(zip(top_ids, top_values, strict=True))})
        return entries

    def _draft_after_prefill(self, seqs: list[Sequence], ids: Tensor, hidden: Tensor, last: Tensor,
                             first: Tensor, batch: SamplingBatch) -> None:
        """MTP entries for positions 1..L (h_{i-1} with token i; the sampled first token at L), then a draft."""
        shifted = torch.cat((ids[:, 1:], ids[:, :1]), dim=1).scatter(1, last[:, None], first[:, None])
        positions = torch.arange(1, ids.shape[1] + 1, device=self.device).expand(len(seqs), -1)
        logits, _ = self.model.mtp_step(shifted, hidden, positions, self.mtp_cache, self._slots(seqs),
                                        logits_index=last[:, None])
        self._store_drafts(seqs, logits[:, 0], batch.at(1))

    # ---- decode ------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> None:
        """One step for every running sequence: one new token each, or up to two when speculating."""
        if self.speculative:
            return self._speculate(seqs)
        ids = self._tensor([[s.output_ids[-1]] for s in seqs])
        positions = self._tensor([[s.next_position] for s in seqs])
        logits = self.model(ids, positions, self.cache, self._slots(seqs))[:, -1]
        batch = self._batch(seqs)
        tokens = sample(self._process(self._constrain(logits, seqs), batch, seqs), batch)
        self._append(seqs, [tokens[:, None]], [logits], torch.zeros_like(tokens))

    def _speculate(self, seqs: list[Sequence]) -> None:
        """Verify each slot's draft with the main model (positions p, p+1), accept or reject it by the
        speculative rule (the output distribution is the main model's), then draft the next token with MTP."""
        slots = self._slots(seqs)
        last = self._tensor([s.output_ids[-1] for s in seqs])
        pos = self._tensor([s.next_position for s in seqs])
        draft = self.drafts[slots]
        out = self.model.run(torch.stack((last, draft), 1), torch.stack((pos, pos + 1), 1), self.cache, slots)
        batch = self._batch(seqs)
        target = self._process(self._constrain(out.logits[:, 0], seqs), batch, seqs)
        draft_probs = None if batch.all_greedy else self.draft_probs[slots]
        first, accepted = verify(target, draft_probs, draft, batch)
        bonus_batch = batch.at(1)
        bonus_logits = self._constrain(out.logits[:, 1], seqs, draft)
        bonus = sample(self._process(bonus_logits, bonus_batch, seqs, extra=draft), bonus_batch)
        emitted = torch.stack((first, bonus), 1)
        self._append(seqs, [emitted[:, :1], emitted[:, 1:]], [out.logits[:, 0], out.logits[:, 1]],
                     accepted.long())
        for seq, ok in zip(seqs, accepted.tolist(), strict=True):
            seq.drafted += 1
            seq.accepted += int(ok)
        # MTP entries for p+1 (and p+2 when the draft was accepted); the draft comes from the last of them.
        mtp_ids = torch.where(accepted[:, None], emitted, first[:, None].expand(-1, 2))
        logits, _ = self.model.mtp_step(mtp_ids, out.hidden, torch.stack((pos + 1, pos + 2), 1), self.mtp_cache,
                                        slots, logits_index=accepted.long()[:, None])
        self._store_drafts(seqs, logits[:, 0], batch.at(1 + accepted.long()))

    def _store_drafts(self, seqs: list[Sequence], logits: Tensor, batch: SamplingBatch) -> None:
        slots = self._slots(seqs)
        processed = process(logits, batch)
        self.drafts[slots] = sample(processed, batch, DRAFT)
        if not batch.all_greedy:
            if self.draft_probs is None:
                self.draft_probs = torch.zeros(self.drafts.shape[0], self.vocab, device=self.device)
            self.draft_probs[slots] = processed.softmax(dim=-1)

    def _constrain(self, logits: Tensor, seqs: list[Sequence], draft: Tensor | None = None) -> Tensor:
        """Raw `logits` with the tokens each constrained sequence's grammar forbids next at -inf, before any
        processing: truncation (top-k, top-p, min-p) then keeps allowed tokens only. With `draft` [B]:
        at the position after each row's draft, as if it had been taken (a speculative step's bonus token); a
        row whose draft the grammar forbids keeps its logits, as its draft and bonus are rejected anyway."""
        constrained = [(row, s.constraint) for row, s in enumerate(seqs) if s.constraint is not None]
        if not constrained or self.grammars is None:
            return logits
        drafts = None if draft is None else draft.tolist()
        matchers, taken, starting, free = [], [], [], []
        try:
            for row, constraint in constrained:
                if drafts is not None and constraint.active:
                    if constraint.matcher.try_consume_tokens([drafts[row]]) != 1:
                        continue
                    taken.append(constraint.matcher)
                elif not constraint.active and (drafts is None or drafts[row] != constraint.after):
                    # free text still (the grammar starts after the `after` token), which must not end the
                    # reply, and when it is used up, `after` comes now
                    (starting if constraint.must_start(ahead=0 if drafts is None else 1) else free).append(row)
                    continue
                matchers.append((constraint.matcher, row))
            allowed = self.grammars.allowed(matchers, len(seqs), logits.device)
        finally:
            for matcher in taken:
                matcher.rollback(1)
        for row in starting:
            allowed[row] = False
            allowed[row, seqs[row].constraint.after] = True
        if free:
            allowed[self._tensor(free)[:, None], self._tensor(self.grammars.eos_ids)] = False
        return logits.masked_fill(~allowed, float("-inf"))

    # ---- sampling state ----------------------------------------------------------------------
    def _slots(self, seqs: list[Sequence]) -> Tensor:
        return self._tensor([s.slot for s in seqs])

    def _batch(self, seqs: list[Sequence]) -> SamplingBatch:
        return SamplingBatch.build([s.params for s in seqs], [s.seed for s in seqs],
                                   [len(s.output_ids) for s in seqs], self.vocab, self.device)

    def _reset_penalty_state(self, seqs: list[Sequence]) -> None:
        if not any(s.params.penalised for s in seqs):
            return
        if self.counts is None:
            self.counts = torch.zeros(self.drafts.shape[0], self.vocab, device=self.device)
            self.seen = torch.zeros(self.drafts.shape[0], self.vocab, dtype=torch.bool, device=self.device)
        for seq in seqs:
            self.counts[seq.slot] = 0
            self.seen[seq.slot] = False
            self.seen[seq.slot, self._tensor(seq.prompt_ids)] = True

    def _process(self, logits: Tensor, batch: SamplingBatch, seqs: list[Sequence],
                 extra: Tensor | None = None) -> Tensor:
        """Processed logits; `extra` [B] counts as one more generated token (the position after a draft)."""
        if self.counts is None or not batch.any_penalty:
            return process(logits, batch)
        slots = self._slots(seqs)
        counts, seen = self.counts[slots], self.seen[slots]
        if extra is not None:
            counts = counts.scatter_add(1, extra[:, None], torch.ones_like(counts[:, :1]))
            seen = seen.scatter(1, extra[:, None], True)
        return process(logits, batch, counts, seen)

    def _append(self, seqs: list[Sequence], tokens: list[Tensor], logits: list[Tensor], extra: Tensor) -> None:
        """Append tokens[0] to every sequence and tokens[1] to rows where `extra` is 1; stop rules apply."""
        top = max((s.params.logprobs or 0) for s in seqs)
        want_logprobs = any(s.params.logprobs is not None for s in seqs)
        columns = []
        for token, raw in zip(tokens, logits, strict=True):
            chosen = token[:, 0]
            lp = [token_logprobs(raw, chosen, top)] if want_logprobs else []
            columns.append((chosen.tolist(), *[x.tolist() for x in (lp[0] if lp else ())]))
        counts_per_row = (1 + extra).tolist()
        for row, seq in enumerate(seqs):
            for col in range(counts_per_row[row]):
                if seq.finished:
                    break
                chosen = columns[col][0][row]
                logprobs = None
                if seq.logprobs is not None:
                    _, chosen_lp, top_values, top_ids = columns[col]
                    k = seq.params.logprobs
                    logprobs = {chosen: chosen_lp[row], **dict(zip(top_ids[row][:k], top_values[row][:k],
                                                                 strict=True))}
                seq.append(chosen, logprobs)
                if self.counts is not None and seq.params.penalised:
                    self.counts[seq.slot, chosen] += 1
                    self.seen[seq.slot, chosen] = True
