"""Building blocks shared by the command-line modules of every stage.

Each stage owns its CLI module (``sequences/cli.py``, ``recon/cli.py`` ...); the
top-level ``mrharmony`` command (:mod:`mrharmony.cli`) only registers them by name.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

import click

__all__ = ["LazyGroup", "console"]


def console() -> Any:
    """A rich console for command output (150 columns when not on a terminal)."""
    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 150)


class LazyGroup(click.Group):
    """A click group whose subcommands live in other modules and load on first use.

    ``lazy_commands`` maps a command name to ``"module:attribute"``; keeping the
    imports lazy keeps ``mrharmony --help`` fast and free of heavy optional imports.
    """

    def __init__(self, *args: Any, lazy_commands: dict[str, str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def _available(self, name: str) -> bool:
        module = self.lazy_commands[name].split(":")[0]
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            return False

    def list_commands(self, ctx: click.Context) -> list[str]:
        lazy = [n for n in self.lazy_commands if self._available(n)]
        return sorted(set(super().list_commands(ctx)) | set(lazy))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_commands and cmd_name not in self.commands:
            module, attr = self.lazy_commands[cmd_name].split(":")
            if not self._available(cmd_name):
                return None
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, cmd_name)
