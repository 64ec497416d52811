"""The offline Python API: `LLM(model=...).generate(prompts, SamplingParams(...))` and `.chat(...)`."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

from lmserve.engine.factory import create_engine
from lmserve.errors import InvalidParameterError
from lmserve.engine.beam_search import beam_score
from lmserve.lora import LoRARequest
from lmserve.outputs import BeamSearchOutput, BeamSequence, RequestOutput
from lmserve.sampling_params import BeamSearchParams, SamplingParams

Prompt = str | list[int]
Message = dict[str, str]


class LLM:
    """Loads a model once and generates for batches of prompts with continuous batching.

    `model` is None (the embedded SmolLM2-135M-Instruct), a short name, a .gguf file or a Hugging
    Face model directory. Other keyword arguments are `EngineConfig` fields (dtype, device,
    kv_cache_memory, num_kv_blocks, max_model_len, max_num_seqs, max_num_batched_tokens,
    enable_lora, max_loras, max_lora_rank, ...).
    """

    def __init__(self, model: str | None = None, **engine_kwargs):
        self.engine = create_engine(model, **engine_kwargs)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """`sampling_params` and `lora_request` (the adapter to run with, None: the base model)
        are one for all prompts or a list aligned with them."""
        prompt_list = _as_prompt_list(prompts)
        params_list = _per_prompt(sampling_params, prompt_list, "sampling_params")
        params_list = [params or SamplingParams() for params in params_list]
        lora_list = _per_prompt(lora_request, prompt_list, "lora_request")
        ids = []
        try:
            for prompt, params, lora in zip(prompt_list, params_list, lora_list):
                ids.append(self.engine.add_request(prompt, params, lora_request=lora))
        except Exception:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        finals: dict[str, RequestOutput] = {}
        from tqdm import tqdm

        bar = tqdm(total=len(ids), desc="generate", disable=not use_tqdm or len(ids) < 2)
        try:
            while len(finals) < len(ids):
                for output in self.engine.step():
                    if output.finished:
                        finals[output.request_id] = output
                        bar.update(1)
        except BaseException:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        return [finals[request_id] for request_id in ids]

    def beam_search(self, prompts: Prompt | Sequence[Prompt], params: BeamSearchParams,
                    use_tqdm: bool = True) -> list[BeamSearchOutput]:
        """Beam search for each prompt; per prompt the `beam_width` best hypotheses, best first."""
        outputs = self.generate(prompts, [params] * len(_as_prompt_list(prompts)), use_tqdm=use_tqdm)
        return [BeamSearchOutput(out.prompt, out.prompt_token_ids, [
            BeamSequence(c.token_ids, c.text, c.cumulative_logprob,
                         beam_score(c.cumulative_logprob, len(c.token_ids), params.length_penalty), c.finish_reason)
            for c in out.outputs]) for out in outputs]

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
               lora_request: LoRARequest | None = None) -> Iterator[RequestOutput]:
        """Yield the request's output after every step that produced tokens (deltas in `delta_text`)."""
        request_id = self.engine.add_request(prompt, sampling_params, lora_request=lora_request)
        try:
            while True:
                for output in self.engine.step():
                    if output.request_id == request_id:
                        yield output
                        if output.finished:
                            return
        finally:
            self.engine.abort_request(request_id)

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        if self.tokenizer is None:
            raise InvalidParameterError("messages", "this model has no tokenizer, so chat is unavailable")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True,
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[RequestOutput]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.apply_chat_template(c, add_generation_prompt) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)


def _per_prompt(value, prompts: list[Prompt], name: str) -> list:
    """`value` for each prompt: a list or tuple aligned with them, or one value for all."""
    if isinstance(value, (list, tuple)):
        if len(value) != len(prompts):
            raise InvalidParameterError(name, f"got {len(value)} for {len(prompts)} prompts")
        return list(value)
    return [value] * len(prompts)


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise InvalidParameterError("prompts", "must not be empty")
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
            return [list(prompts)]
        return list(prompts)
    raise InvalidParameterError("prompts", "must be a string, a list of strings or a list of token-id lists")


logging.getLogger("lmserve").addHandler(logging.NullHandler())
