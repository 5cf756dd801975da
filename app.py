"""`python app.py`: the streamchat browser chat on http://127.0.0.1:7860 (see docs/readme/ui.md).

Flags: --host, --port, --config, --model and the other settings flags of `python -m streamchat chat`.
"""

from __future__ import annotations

import argparse
import sys

from streamchat import ui
from streamchat.cli import add_settings_arguments
from streamchat.config import SettingsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="streamchat in the browser: endless chat in constant memory.")
    add_settings_arguments(parser)
    ui.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return ui.main(args)
    except SettingsError as error:
        print(f"streamchat: config error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
