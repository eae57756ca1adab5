"""The model's tokenizer and chat template, received from the shard group's Info.

Only `tokenizers` and jinja2: the router needs no model files and no torch.
"""

from __future__ import annotations

import json
import re
from datetime import datetime

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from router.errors import ValidationError
from sluice.v1 import generate_pb2 as pb


def _raise_exception(message: str):
    raise TemplateError(message)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level vocabulary spells byte b as one printable character: that map, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: b for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = 256 + n
    return {chr(c): b for b, c in chars.items()}


_BYTE_OF_CHAR = _byte_level_alphabet()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte tokens


class RouterTokenizer:
    def __init__(self, spec: pb.Tokenizer):
        self.tokenizer = Tokenizer.from_str(spec.tokenizer_json)
        self.bos_token = spec.bos_token
        self.eos_token = spec.eos_token
        self.eos_token_ids = tuple(spec.eos_token_ids)
        self.special_ids = frozenset(
            i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special)
        # Byte-level BPE (GPT-2, Llama 3, SmolLM2), whether its decoder is alone or in a Sequence.
        decoder = json.loads(spec.tokenizer_json).get("decoder") or {}
        self._byte_level = "ByteLevel" in json.dumps(decoder)
        self.chat_template = None
        if spec.chat_template:
            # The conventions of transformers' apply_chat_template, which templates assume.
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self.chat_template = env.from_string(spec.chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_offsets(self, text: str,
                       add_special_tokens: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and, for each, its (start, stop) character offsets into `text`."""
        encoding = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return encoding.ids, encoding.offsets

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = True) -> DecodeStream:
        return DecodeStream(skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        if token_id < 0:  # streaming.WITHHELD_TOKEN_ID: a token the content filter withheld
            return ""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> list[int]:
        """The raw bytes a token stands for: maybe part of a UTF-8 character, unlike its text."""
        piece = self.tokenizer.id_to_token(token_id)
        if piece is not None and token_id not in self.special_ids:
            if self._byte_level and all(c in _BYTE_OF_CHAR for c in piece):
                return [_BYTE_OF_CHAR[c] for c in piece]
            if match := _BYTE_FALLBACK.fullmatch(piece):
                return [int(match[1], 16)]
        return list(self.token_text(token_id).encode())

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ValidationError("this model has no chat template; use /v1/completions or "
                                  "/generate with a plain prompt", param="messages")
        try:
            return self.chat_template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as exc:
            raise ValidationError(f"chat template: {exc}", param="messages") from exc
