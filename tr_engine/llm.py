"""The offline API, in vLLM's style: `LLM(...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import uuid

from .config import EngineConfig
from .engine.llm_engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams


class LLM:
    """A model served by `world_size` ranks on this host (the other ranks are started here
    and stopped by `close()` or the `with` block).

    model: a local Hugging Face checkpoint folder; None = the embedded SmolLM2 model.
    device: "cpu" | "cuda" | "npu" | "auto"; dtype: "auto" | "float32" | "bfloat16" |
    "float16". Other EngineConfig fields pass as keywords.
    """

    def __init__(self, model: str | None = None, device: str = "auto", world_size: int = 1,
                 dtype: str = "auto", **kwargs) -> None:
        self.config = EngineConfig(model=model, device=device, world_size=world_size,
                                   dtype=dtype, **kwargs)
        self.engine = LLMEngine(self.config)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None
                 = None) -> list[RequestOutput]:
        """prompts: a string, a list of strings, or vLLM-style {"prompt_token_ids": [...]}
        dicts (or a list of them). Returns one finished RequestOutput per prompt, in order;
        one the engine failed to serve has finish_reason "error" and `.error` set (the
        others are unaffected)."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = sampling_params or self.get_default_sampling_params()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        encoded = [self._encode(p) for p in prompts]
        for ids, p in zip(encoded, params):
            self.engine.check(ids[1], p)  # refuse before any request starts
        return self._run(encoded, params)

    def get_default_sampling_params(self) -> SamplingParams:
        """The SamplingParams `generate` uses when given none: the model's generation
        config's values (EngineConfig.generation_config), else the plain defaults."""
        return SamplingParams(**self.engine.sampling_defaults)

    def chat(self, messages, sampling_params: SamplingParams | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """messages: one conversation (a list of {"role", "content"} dicts) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": self.engine.encode_chat(conv, add_generation_prompt)}
                   for conv in conversations]
        return self.generate(prompts, sampling_params)

    def prompt_logits(self, prompt_token_ids: list[int]):
        """float32 logits of every prompt position, through the sharded prefill."""
        return self.engine.prompt_logits(list(prompt_token_ids))

    def _encode(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        raise TypeError(f"a prompt is a string or {{'prompt_token_ids': [...]}}; got {prompt!r}")

    def _run(self, encoded, params) -> list[RequestOutput]:
        ids = [uuid.uuid4().hex for _ in encoded]
        for rid, (text, tokens), p in zip(ids, encoded, params):
            self.engine.add_request(rid, tokens, p, prompt=text)
        final: dict[str, RequestOutput] = {}
        while self.engine.has_work():
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[rid] for rid in ids]

    def close(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
            self.engine = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

