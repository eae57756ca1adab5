from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_NONE: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_EOS_TOKEN: _ClassVar[FinishReason]
    FINISH_REASON_STOP_TOKEN: _ClassVar[FinishReason]
FINISH_REASON_NONE: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_EOS_TOKEN: FinishReason
FINISH_REASON_STOP_TOKEN: FinishReason

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_id", "model_dtype", "device_type", "attention_backend", "num_shards", "block_size", "max_batch_total_tokens", "max_batch_prefill_tokens", "max_input_tokens", "max_total_tokens", "max_batch_size", "free_budget_tokens", "tokenizer", "version", "vocab_size", "quantization", "prefill_chunk_tokens")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_BACKEND_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    FREE_BUDGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    PREFILL_CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model_dtype: str
    device_type: str
    attention_backend: str
    num_shards: int
    block_size: int
    max_batch_total_tokens: int
    max_batch_prefill_tokens: int
    max_input_tokens: int
    max_total_tokens: int
    max_batch_size: int
    free_budget_tokens: int
    tokenizer: Tokenizer
    version: str
    vocab_size: int
    quantization: str
    prefill_chunk_tokens: int
    def __init__(self, model_id: _Optional[str] = ..., model_dtype: _Optional[str] = ..., device_type: _Optional[str] = ..., attention_backend: _Optional[str] = ..., num_shards: _Optional[int] = ..., block_size: _Optional[int] = ..., max_batch_total_tokens: _Optional[int] = ..., max_batch_prefill_tokens: _Optional[int] = ..., max_input_tokens: _Optional[int] = ..., max_total_tokens: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., free_budget_tokens: _Optional[int] = ..., tokenizer: _Optional[_Union[Tokenizer, _Mapping]] = ..., version: _Optional[str] = ..., vocab_size: _Optional[int] = ..., quantization: _Optional[str] = ..., prefill_chunk_tokens: _Optional[int] = ...) -> None: ...

class Tokenizer(_message.Message):
    __slots__ = ("tokenizer_json", "chat_template", "bos_token", "eos_token", "eos_token_ids")
    TOKENIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    BOS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    tokenizer_json: str
    chat_template: str
    bos_token: str
    eos_token: str
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, tokenizer_json: _Optional[str] = ..., chat_template: _Optional[str] = ..., bos_token: _Optional[str] = ..., eos_token: _Optional[str] = ..., eos_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SamplingParameters(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "frequency_penalty", "presence_penalty", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TYPICAL_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    typical_p: float
    repetition_penalty: float
    frequency_penalty: float
    presence_penalty: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., typical_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class StoppingParameters(_message.Message):
    __slots__ = ("max_new_tokens", "ignore_eos", "stop_token_ids")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    ignore_eos: bool
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, max_new_tokens: _Optional[int] = ..., ignore_eos: bool = ..., stop_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Request(_message.Message):
    __slots__ = ("id", "input_ids", "sampling", "stopping", "top_n_tokens", "trace_context", "prefill_logprobs", "resumed_tokens")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    TOP_N_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    PREFILL_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    RESUMED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    id: int
    input_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParameters
    stopping: StoppingParameters
    top_n_tokens: int
    trace_context: _containers.ScalarMap[str, str]
    prefill_logprobs: bool
    resumed_tokens: int
    def __init__(self, id: _Optional[int] = ..., input_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParameters, _Mapping]] = ..., stopping: _Optional[_Union[StoppingParameters, _Mapping]] = ..., top_n_tokens: _Optional[int] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., prefill_logprobs: bool = ..., resumed_tokens: _Optional[int] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[Request]
    def __init__(self, requests: _Optional[_Iterable[_Union[Request, _Mapping]]] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("batch", "cancel")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    batch: Batch
    cancel: Cancel
    def __init__(self, batch: _Optional[_Union[Batch, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ...) -> None: ...

class TokenBatch(_message.Message):
    __slots__ = ("ids", "token_ids", "logprobs", "finish_reasons", "top_n_counts", "top_n_token_ids", "top_n_logprobs")
    IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASONS_FIELD_NUMBER: _ClassVar[int]
    TOP_N_COUNTS_FIELD_NUMBER: _ClassVar[int]
    TOP_N_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_N_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    finish_reasons: _containers.RepeatedScalarFieldContainer[FinishReason]
    top_n_counts: _containers.RepeatedScalarFieldContainer[int]
    top_n_token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_n_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., finish_reasons: _Optional[_Iterable[_Union[FinishReason, str]]] = ..., top_n_counts: _Optional[_Iterable[int]] = ..., top_n_token_ids: _Optional[_Iterable[int]] = ..., top_n_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class PrefillLogprobs(_message.Message):
    __slots__ = ("id", "logprobs", "top_n_token_ids", "top_n_logprobs")
    ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_N_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_N_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    id: int
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    top_n_token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_n_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, id: _Optional[int] = ..., logprobs: _Optional[_Iterable[float]] = ..., top_n_token_ids: _Optional[_Iterable[int]] = ..., top_n_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class RequestError(_message.Message):
    __slots__ = ("id", "message", "retryable")
    ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    id: int
    message: str
    retryable: bool
    def __init__(self, id: _Optional[int] = ..., message: _Optional[str] = ..., retryable: bool = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("tokens", "admitted_ids", "errors", "free_budget_tokens", "waiting_requests", "prefill_logprobs", "draining")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_IDS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    FREE_BUDGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    tokens: TokenBatch
    admitted_ids: _containers.RepeatedScalarFieldContainer[int]
    errors: _containers.RepeatedCompositeFieldContainer[RequestError]
    free_budget_tokens: int
    waiting_requests: int
    prefill_logprobs: _containers.RepeatedCompositeFieldContainer[PrefillLogprobs]
    draining: bool
    def __init__(self, tokens: _Optional[_Union[TokenBatch, _Mapping]] = ..., admitted_ids: _Optional[_Iterable[int]] = ..., errors: _Optional[_Iterable[_Union[RequestError, _Mapping]]] = ..., free_budget_tokens: _Optional[int] = ..., waiting_requests: _Optional[int] = ..., prefill_logprobs: _Optional[_Iterable[_Union[PrefillLogprobs, _Mapping]]] = ..., draining: bool = ...) -> None: ...
