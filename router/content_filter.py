"""The content filter: word lists and regexes per direction, and an optional Python hook.

Rules file (YAML): `prompt: {words: [...], regex: [...]}` and `output: {words: [...], regex:
[...]}`, all case-insensitive, words matched on word boundaries. A hook `module:function` is
called as `function(direction, text, final)` and returns a Verdict or None; with a rules file it
extends the rules, alone it replaces them.

On the output side text is released only once no rule can match it any more: a tail that could
still grow into a match is held back (regex partial matching), so matched text is never sent.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import regex
import yaml

DIRECTIONS = ("prompt", "output")


@dataclass(slots=True, frozen=True)
class Verdict:
    """What a check found: text blocked from `blocked_at` on, or held from `hold_from` on
    because it may still become a match once more text arrives."""

    blocked_at: int | None = None
    hold_from: int | None = None


Hook = Callable[[str, str, bool], "Verdict | None"]


def _pattern(rules: dict, where: str) -> regex.Pattern | None:
    unknown = set(rules) - {"words", "regex"}
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)} (expected words, regex)")
    words, patterns = rules.get("words") or [], rules.get("regex") or []
    if not all(isinstance(w, str) and w.strip() for w in words):
        raise ValueError(f"{where}.words must be a list of non-empty strings")
    if not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"{where}.regex must be a list of non-empty strings")
    # A word counts only where it is not part of a longer word: lookarounds rather than \b, so
    # that words that start or end with punctuation ("c++") work too.
    alternatives = "|".join(regex.escape(w.strip()) for w in words)
    parts = [rf"(?<!\w)(?:{alternatives})(?!\w)"] if words else []
    for p in patterns:
        try:
            compiled = regex.compile(p, regex.IGNORECASE)
        except regex.error as exc:
            raise ValueError(f"{where}.regex: {p!r} is not a valid regex: {exc}") from exc
        if compiled.fullmatch(""):
            raise ValueError(f"{where}.regex: {p!r} matches empty text, so it would match "
                             f"everywhere")
        parts.append(f"(?:{p})")
    return regex.compile("|".join(parts), regex.IGNORECASE) if parts else None


def _check_pattern(pattern: regex.Pattern, text: str, pos: int, final: bool) -> Verdict | None:
    match = pattern.search(text, pos=pos, partial=not final)
    if match is None or match.start() == len(text):
        return None
    # A match that reaches the end of unfinished text may yet fail (a word that grows into a
    # longer word) or grow: hold it until the next piece settles it.
    if match.partial or (not final and match.end() == len(text)):
        return Verdict(hold_from=match.start())
    return Verdict(blocked_at=match.start())


class ContentFilter:
    def __init__(self, patterns: dict[str, regex.Pattern | None], hook: Hook | None = None):
        self._patterns = patterns
        self._hook = hook

    def check(self, direction: str, text: str, final: bool = True, pos: int = 0) -> Verdict | None:
        """Rules (searched from `pos`) and hook on `text`; the earliest finding wins."""
        verdicts = []
        pattern = self._patterns.get(direction)
        if pattern is not None:
            verdicts.append(_check_pattern(pattern, text, pos, final))
        if self._hook is not None:
            verdicts.append(self._hook(direction, text, final))
        verdicts = [v for v in verdicts if v is not None]
        blocked = [v.blocked_at for v in verdicts if v.blocked_at is not None]
        held = [v.hold_from for v in verdicts if v.hold_from is not None]
        if blocked:
            return Verdict(blocked_at=min(blocked))
        return Verdict(hold_from=min(held)) if held else None

    def prompt_blocked(self, text: str) -> bool:
        verdict = self.check("prompt", text)
        return verdict is not None and verdict.blocked_at is not None

    def output_guard(self) -> "OutputGuard | None":
        if self._patterns.get("output") is None and self._hook is None:
            return None
        return OutputGuard(self)


class OutputGuard:
    """One response's growing text: how much is cleared for sending, or where it is blocked."""

    def __init__(self, content_filter: ContentFilter):
        self._filter = content_filter
        self.text = ""  # everything generated so far, cleared or not
        self.cleared = 0  # text[:cleared] can be sent
        self.blocked_at: int | None = None
        self._scan_from = 0  # no match starts before this (matches never start in cleared text)

    def feed(self, piece: str, final: bool = False) -> None:
        if self.blocked_at is not None:
            return
        self.text += piece
        verdict = self._filter.check("output", self.text, final, self._scan_from)
        if verdict is None or (final and verdict.blocked_at is None):
            self.cleared = self._scan_from = len(self.text)  # at the end, nothing is pending
        elif verdict.blocked_at is not None:
            self.blocked_at = verdict.blocked_at
            self.cleared = min(self.cleared, self.blocked_at)
        else:
            self.cleared = self._scan_from = max(verdict.hold_from, self.cleared)


def _load_hook(spec: str) -> Hook:
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"--content-filter-hook {spec!r} must be module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--content-filter-hook: cannot import {module_name}: {exc}") from exc
    hook = getattr(module, function_name, None)
    if not callable(hook):
        raise ValueError(f"--content-filter-hook: {module_name} has no function {function_name}")
    return hook


def parse_rules(document: str, where: str) -> dict[str, regex.Pattern | None]:
    try:
        data = yaml.safe_load(document) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{where} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or set(data) - set(DIRECTIONS):
        raise ValueError(f"{where} must be a mapping with 'prompt' and/or 'output' rules")
    patterns = {}
    for direction in DIRECTIONS:
        rules = data.get(direction) or {}
        if not isinstance(rules, dict):
            raise ValueError(f"{where}: {direction} must be a mapping of words and regex")
        patterns[direction] = _pattern(rules, f"{where}: {direction}")
    return patterns


def load_filter(path: str | None, hook_spec: str | None) -> ContentFilter | None:
    """The filter of --content-filter and --content-filter-hook; None when neither is given."""
    if not path and not hook_spec:
        return None
    patterns = parse_rules(Path(path).read_text(), path) if path else {}
    return ContentFilter(patterns, _load_hook(hook_spec) if hook_spec else None)
