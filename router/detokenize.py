"""Token ids to text as they arrive, with stop strings that never leak into the output.

Text is released only once it can no longer turn into a stop string: a tail that could still
grow into one is held back until the next token settles it. Multi-byte characters split over
tokens come out whole (the tokenizers library's DecodeStream holds partial UTF-8).
"""

from __future__ import annotations

from router.tokenizer import RouterTokenizer


class TextStream:
    def __init__(self, tokenizer: RouterTokenizer, stop: list[str],
                 skip_special_tokens: bool = True):
        self._tokenizer = tokenizer.tokenizer
        self._decoder = tokenizer.decode_stream(skip_special_tokens)
        self._stop = [s for s in stop if s]
        self._held = ""
        self._released: list[str] = []  # joined when asked for: no copy of the text per token
        self.stopped_by: str | None = None

    @property
    def text(self) -> str:
        """Everything released so far."""
        return "".join(self._released)

    def push(self, token_id: int) -> str:
        """Feed one token; returns the text it releases (often "", never part of a stop)."""
        if self.stopped_by is not None:
            return ""  # nothing after a stop string is ever output
        piece = self._decoder.step(self._tokenizer, token_id) or ""
        if not self._stop:
            self._released.append(piece)
            return piece
        pending = self._held + piece
        match = min(((pending.find(s), s) for s in self._stop if s in pending), default=None)
        if match is not None:
            index, self.stopped_by = match
            return self._release(pending[:index], held="")
        keep = max(_overlap(pending, s) for s in self._stop)
        return self._release(pending[:len(pending) - keep], held=pending[len(pending) - keep:])

    def flush(self) -> str:
        """The held-back tail, once generation ended without completing a stop string."""
        return self._release(self._held, held="")

    def _release(self, text: str, held: str) -> str:
        self._held = held
        self._released.append(text)
        return text


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0
