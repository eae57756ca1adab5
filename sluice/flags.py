"""Flags that also read the environment, as TGI's launcher does.

Every `--max-batch-total-tokens` flag reads `MAX_BATCH_TOTAL_TOKENS` when it is not given on the
command line; the command line wins. The environment is passed in explicitly by each process's
main, so that no module reads os.environ on its own.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class _AppendReplacingDefault(argparse._AppendAction):
    """Repeatable flag whose first use on the command line replaces the environment's list."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest) is self.default:
            setattr(namespace, self.dest, [])
        super().__call__(parser, namespace, values, option_string)


def env_name(action: argparse.Action) -> str:
    long = next(s for s in action.option_strings if s.startswith("--"))
    return long[2:].upper().replace("-", "_")


def _env_value(action: argparse.Action, raw: str, env: str):
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        word = raw.strip().lower()
        if word not in _TRUE | _FALSE:
            raise SystemExit(f"error: {env}={raw!r} is not a boolean (use true or false)")
        return word in _TRUE
    if isinstance(action, argparse._AppendAction):
        convert = action.type or str
        return [convert(part.strip()) for part in raw.split(",") if part.strip()]
    return raw  # argparse applies `type` to string defaults itself


def apply_environment(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Make each long flag default to its environment variable, and say so in --help."""
    for action in parser._actions:
        if not any(s.startswith("--") for s in action.option_strings) or action.dest == "help":
            continue
        env = env_name(action)
        shown_default = action.default
        if env in environ:
            action.default = _env_value(action, environ[env], env)
            action.required = False
            if isinstance(action, argparse._AppendAction):
                action.__class__ = _AppendReplacingDefault
        extra = f"[env: {env}]"
        if not (shown_default is None or shown_default is False or shown_default == []
                or shown_default is argparse.SUPPRESS):
            extra += f" [default: {shown_default}]"
        action.help = f"{action.help or ''} {extra}".strip()
