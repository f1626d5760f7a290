"""The examples' ``--help`` format: every option with a default shows it, unless
its help text already says it or the default is None (the text says what then)."""

from __future__ import annotations

import argparse
import copy


class Defaults(argparse.HelpFormatter):
    def _format_action(self, action: argparse.Action) -> str:
        shown = action.default not in (None, argparse.SUPPRESS) and action.option_strings
        if shown and "default" not in (action.help or ""):
            action = copy.copy(action)
            action.help = f"{action.help or ''} (default: %(default)s)".lstrip()
        return super()._format_action(action)
