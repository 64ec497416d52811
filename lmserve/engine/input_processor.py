"""Requests in: prompt text or ids turned into a validated `Request` and its first `Sequence`.

Checks what depends on the model (token ids inside the vocabulary, prompt plus max_tokens within
the context limit: the one place that limit is enforced, for the library, the CLI and the server
alike), tokenizes, truncates, sets up beam search state, and gives each sequence its seeded
generator, incremental detokenizer, stop-string matcher and, for a constrained request, its
compiled grammar (a constraint that does not compile is refused here).
"""

from __future__ import annotations

import itertools

import torch

from lmserve.config import EngineConfig, ModelConfig
from lmserve.detokenizer import IncrementalDetokenizer, StopStringMatcher
from lmserve.engine.beam_search import BeamSearch
from lmserve.engine.sequence import Request, Sequence
from lmserve.engine.structured_output import StructuredOutputManager
from lmserve.errors import ContextLengthError, InvalidParameterError
from lmserve.sampling_params import BeamSearchParams, SamplingParams


class InputProcessor:
    def __init__(self, tokenizer, model_config: ModelConfig, engine_config: EngineConfig, max_model_len: int,
                 stop_token_ids: frozenset[int], structured: StructuredOutputManager):
        self.tokenizer = tokenizer
        self.structured = structured
        self.vocab_size = model_config.vocab_size
        self.max_num_seqs = engine_config.max_num_seqs
        self.device = engine_config.torch_device
        self.max_model_len = max_model_len
        self.stop_token_ids = stop_token_ids
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self._seed_source = torch.Generator().manual_seed(engine_config.seed)

    def new_request_id(self) -> str:
        return str(next(self._request_ids))

    def prompt_ids(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        """(the prompt's text or None, its token ids), checked."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidParameterError("prompt", "this model has no tokenizer; pass token ids instead of text")
            ids, text = self.tokenizer.encode(prompt), prompt
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in prompt):
            ids, text = list(prompt), None
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidParameterError(
                    "prompt", f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        else:
            raise InvalidParameterError("prompt", "must be a string or a list of integer token ids")
        if not ids:
            raise InvalidParameterError("prompt", "must not be empty")
        return text, ids

    def make_request(self, request_id: str, prompt: str | list[int],
                     params: SamplingParams | BeamSearchParams | None, lora=None) -> Request:
        """A validated request holding its first sequence (the one that computes the prompt; n /
        best_of samples and beams fork from it later). With `BeamSearchParams` it is decoded by
        beam search; `lora` is the LoRA adapter it runs with (None: the base model)."""
        beam_params = params if isinstance(params, BeamSearchParams) else None
        if beam_params is not None:
            params = SamplingParams(max_tokens=beam_params.max_tokens, temperature=0,
                                    ignore_eos=beam_params.ignore_eos)
        params = params or SamplingParams()
        self._check_token_ids(params)
        width = beam_params.beam_width if beam_params is not None else params.num_samples
        if width > self.max_num_seqs:
            raise InvalidParameterError("best_of" if beam_params is None else "beam_width",
                                        f"{width} sequences exceed max_num_seqs ({self.max_num_seqs})")
        text, ids = self.prompt_ids(prompt)
        if params.truncate_prompt_tokens is not None:
            ids = ids[-params.truncate_prompt_tokens:]
        max_tokens = self._check_context(len(ids), params.max_tokens)
        request = Request(request_id, text, ids, params, width=width, lora=lora)
        if params.structured is not None:
            request.grammar = self.structured.compile(params.structured)
        if beam_params is not None:
            request.beam = BeamSearch(beam_params, self.stop_token_ids, max_tokens)
        self.new_sequence(request, list(ids))
        return request

    def _check_context(self, prompt_len: int, max_tokens: int | None) -> int:
        """max_tokens (by default what the context leaves), refused when it does not fit."""
        limit = self.max_model_len
        if max_tokens is None and prompt_len >= limit:
            raise ContextLengthError("prompt", f"the prompt has {prompt_len} tokens, which leaves no room to "
                                               f"generate within the context limit of {limit} tokens")
        max_tokens = max_tokens if max_tokens is not None else limit - prompt_len
        if prompt_len + max_tokens > limit:
            raise ContextLengthError(
                "max_tokens" if prompt_len < limit else "prompt",
                f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}: {prompt_len + max_tokens} "
                f"exceeds the context limit of {limit} tokens (set truncate_prompt_tokens to keep only "
                f"the end of the prompt)")
        return max_tokens

    def scoring_sequence(self, token_ids: list[int], lora=None) -> Sequence:
        """A temporary sequence whose every token is to be computed (for `LLMEngine.score`)."""
        _, ids = self.prompt_ids(list(token_ids))
        if len(ids) > self.max_model_len:
            raise ContextLengthError("token_ids", f"{len(ids)} tokens exceed the context limit of "
                                                  f"{self.max_model_len} tokens")
        request = Request(f"score-{self.new_request_id()}", None, ids, SamplingParams(max_tokens=1), lora=lora)
        return Sequence(next(self._seq_ids), request, 0, list(ids), len(ids), generator=None)

    def new_sequence(self, request: Request, token_ids: list[int]) -> Sequence:
        """The request's next sequence (appended to `request.seqs`) holding `token_ids`."""
        params, index = request.params, len(request.seqs)
        seq = Sequence(next(self._seq_ids), request, index, token_ids, len(request.prompt_token_ids),
                       generator=None if params.greedy else self._generator(params.seed, index))
        if self.tokenizer is not None and request.beam is None:  # beams are decoded once, at the end
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids,
                                                     params.skip_special_tokens)
        if params.stop:
            seq.stop_matcher = StopStringMatcher(params.stop)
        if request.grammar is not None:  # forks are made before any token is generated
            seq.grammar = request.grammar.copy()
        request.seqs.append(seq)
        return seq

    def _check_token_ids(self, params: SamplingParams) -> None:
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias or {})):
            bad = [t for t in ids if t >= self.vocab_size]
            if bad:
                raise InvalidParameterError(name, f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")

    def _generator(self, seed: int | None, index: int) -> torch.Generator:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_source))
        else:
            seed = (seed + index * 1_000_003) % (1 << 63)  # n samples of one seeded request must differ
        return torch.Generator(device=self.device).manual_seed(seed)
