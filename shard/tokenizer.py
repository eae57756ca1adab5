"""The tokenizer a shard hands to routers through Info: a `tokenizers` JSON plus chat template."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) and the splits they stand for.
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone")
_GPT2 = ("default", "gpt2", "mpt", "olmo", "jais")
_SPLIT_REGEX = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
_CONTROL, _USER_DEFINED = 3, 4  # gguf.TokenType values
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
BYTE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass(slots=True, frozen=True)
class TokenizerSpec:
    tokenizer_json: str
    chat_template: str
    bos_token: str
    eos_token: str
    eos_token_ids: tuple[int, ...]


def bpe_tokenizer_json(*, tokens: list[str], merges: list[str], token_types: list[int], pre: str,
                       bos_token: str | None, add_bos: bool) -> str:
    """A byte-level BPE tokenizer from GGUF vocabulary data.

    transformers' GGUF converter ignores llama.cpp's pre-tokenizer name (SmolLM2 splits digits one
    by one) and GGUF's add_bos_token, so the tokenizer is assembled here from the same parts.
    """
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                     merges=[tuple(m.split(" ", 1)) for m in merges])
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in _SPLIT_REGEX)
    if pre in _DIGITS_THEN_GPT2:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _SPLIT_REGEX:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_SPLIT_REGEX[pre]), behavior="isolated"), byte_level])
    elif pre in _GPT2:
        tok.pre_tokenizer = byte_level
    else:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported yet")
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, token_types) if kind == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED])
    if add_bos and bos_token:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, tokens.index(bos_token))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE without merges: ids 0-2 are special, then one token per byte."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(BYTE_SPECIALS + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(BYTE_SPECIALS)
    return tok


def byte_spec(vocab_size: int) -> TokenizerSpec:
    """A stand-in tokenizer for random weights (--load-format dummy on a bare config): one
    token per byte, so a prompt of n ASCII characters is n tokens; every other id of the
    model's vocabulary decodes to a visible `<|id|>`, so random outputs still stream text."""
    tok = byte_tokenizer()
    tok.add_tokens([AddedToken(f"<|{i}|>", special=False, normalized=False)
                    for i in range(tok.get_vocab_size(), vocab_size)])
    return TokenizerSpec(tokenizer_json=tok.to_str(), chat_template=CHATML,
                         bos_token="<|im_start|>", eos_token="<|im_end|>", eos_token_ids=(2,))


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in
               ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def from_folder(folder: Path) -> TokenizerSpec:
    """A Hugging Face folder's tokenizer, made fast by transformers when it is not already."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    template = tok.chat_template or ""
    if isinstance(template, dict):
        template = template.get("default", next(iter(template.values()), ""))
    eos_ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    generation_config = folder / "generation_config.json"
    if generation_config.is_file():
        configured = json.loads(generation_config.read_text()).get("eos_token_id")
        eos_ids += configured if isinstance(configured, list) else [configured]
    return TokenizerSpec(
        tokenizer_json=tok.backend_tokenizer.to_str(),
        chat_template=template,
        bos_token=tok.bos_token or "",
        eos_token=tok.eos_token or "",
        eos_token_ids=tuple(dict.fromkeys(int(i) for i in eos_ids if i is not None)),
    )
