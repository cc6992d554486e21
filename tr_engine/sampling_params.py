"""How to sample: the per-request knobs, checked once when the request arrives."""

from __future__ import annotations

from dataclasses import dataclass, field

PROMPT_LOGPROBS_MAX_TOKENS = 4096  # logits of every position: [T, vocab] float32 on rank 0


@dataclass(frozen=True)
class StructuredOutputs:
    """What the output must be (vLLM's structured outputs), exactly one of: `json` (a JSON
    schema, as JSON text), `json_object` (any JSON object), `regex`, `choice` (one of these
    strings) or `grammar` (EBNF, xgrammar's dialect). JSON is compact unless
    `any_whitespace`. `param` names the request field it came from, for errors."""

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    any_whitespace: bool = False
    param: str = field(default="structured_outputs", compare=False)

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [k for k in ("json", "regex", "choice", "grammar")
                 if getattr(self, k) is not None] + (["json_object"] if self.json_object else [])
        if len(given) != 1:
            raise InvalidParameter(self.param, f"{self.param} takes exactly one of json, "
                                   f"json_object, regex, choice, grammar; got "
                                   f"{', '.join(given) or 'none'}")
        if self.choice is not None and not (
                self.choice and all(isinstance(c, str) and c for c in self.choice)):
            raise InvalidParameter(self.param, f"{self.param}: choice must be a non-empty "
                                   "list of non-empty strings")
        for k in ("json", "regex", "grammar"):
            v = getattr(self, k)
            if v is not None and not (isinstance(v, str) and v):
                raise InvalidParameter(self.param, f"{self.param}: {k} must be a non-empty "
                                       "string")

    @property
    def kind(self) -> str:
        if self.json is not None:
            return "JSON schema"
        if self.json_object:
            return "JSON object grammar"
        if self.regex is not None:
            return "regular expression"
        return "choice" if self.choice is not None else "grammar"


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings for one request, in vLLM's vocabulary.

    temperature 0 is greedy. top_k 0 (or -1) and top_p 1 and min_p 0 disable those filters.
    Penalties follow OpenAI (presence, frequency: subtracted from logits of tokens already
    generated) and CTRL/HF (repetition: divides positive logits, multiplies negative ones, of
    tokens in the prompt or output). `logprobs` = how many top alternatives to return with
    each chosen token's own logprob (None = no logprobs). `logit_bias` (OpenAI's): token id
    -> a bias in [-100, 100] added to its logit before anything else; given as a dict or
    pairs, kept as sorted pairs. `prompt_logprobs`: as `logprobs`, for every prompt token
    but the first (which nothing predicts); the prefill then keeps every position's logits,
    so it is limited to prompts of PROMPT_LOGPROBS_MAX_TOKENS. `output_kind`: "final" gives
    the whole text, token ids and logprobs with the last output (each output also holds its
    step's delta); "delta" gives only the deltas, for a stream that never needs the whole.

    Masks on the next token (engine/token_mask.py): `min_tokens` (no EOS or stop token id
    before that many tokens, and no stop string either), `bad_words` (vLLM's: a word's last
    token is banned where the output ends with the rest of it, at the start of the text or
    after a space), `allowed_token_ids` (only these), `structured_outputs` (a grammar).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: tuple[tuple[int, float], ...] = ()
    prompt_logprobs: int | None = None
    min_tokens: int = 0
    bad_words: tuple[str, ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    structured_outputs: StructuredOutputs | None = None
    output_kind: str = "final"
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        bias = self.logit_bias or ()
        pairs = bias.items() if isinstance(bias, dict) else bias
        object.__setattr__(self, "logit_bias", tuple(sorted((t, b) for t, b in pairs)))
        if self.bad_words:
            object.__setattr__(self, "bad_words", tuple(self.bad_words))
        if self.allowed_token_ids is not None:
            object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1,
             "max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}"),
            (0.0 <= self.temperature <= 100.0,
             "temperature", f"must be in [0, 100], got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}"),
            (isinstance(self.top_k, int) and self.top_k >= 0,
             "top_k", f"must be -1, 0 or a positive integer, got {self.top_k!r}"),
            (0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}"),
            (-2.0 <= self.presence_penalty <= 2.0,
             "presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0,
             "frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}"),
            (0.0 < self.repetition_penalty <= 10.0,
             "repetition_penalty", f"must be in (0, 10], got {self.repetition_penalty}"),
            (self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
             "logprobs", f"must be an integer in [0, 20], got {self.logprobs!r}"),
            (all(isinstance(s, str) and s for s in self.stop),
             "stop", "must be non-empty strings"),
            (len(self.stop) <= 16, "stop", "at most 16 stop strings"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "stop_token_ids", "must be non-negative integers"),
            (self.seed is None or isinstance(self.seed, int), "seed", "must be an integer"),
            (self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int)
                                              and 0 <= self.prompt_logprobs <= 20),
             "prompt_logprobs", f"must be an integer in [0, 20], got {self.prompt_logprobs!r}"),
            (isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
             "min_tokens", f"must be an integer in [0, max_tokens = {self.max_tokens}], got "
             f"{self.min_tokens!r}"),
            (all(isinstance(w, str) and w.strip() for w in self.bad_words),
             "bad_words", "must be non-empty strings"),
            (self.allowed_token_ids is None or (
                self.allowed_token_ids and all(isinstance(t, int) and t >= 0
                                               for t in self.allowed_token_ids)),
             "allowed_token_ids", "must be a non-empty list of token ids"),
            (self.structured_outputs is None
             or isinstance(self.structured_outputs, StructuredOutputs),
             "structured_outputs", "must be a StructuredOutputs"),
            (all(isinstance(t, int) and t >= 0 and isinstance(b, int | float)
                 and -100.0 <= b <= 100.0 for t, b in self.logit_bias),
             "logit_bias", "must map token ids to biases in [-100, 100]"),
            (self.output_kind in ("final", "delta"),
             "output_kind", f"must be 'final' or 'delta', got {self.output_kind!r}"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise InvalidParameter(param, f"{param} {message}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class InvalidParameter(ValueError):
    """A request parameter out of range. `param` names it (for OpenAI-style errors)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
