"""`python app.py`: the streamchat browser chat on http://127.0.0.1:7860 (the same as `python -m streamchat ui`), and in
the same process the OpenAI-compatible API at http://127.0.0.1:7860/v1 (docs/server.md); both share one engine.

Flags: --host, --port, --max-sessions, --api-key, --config, --model and the other settings flags of `python -m streamchat chat`.
"""

import sys

from streamchat.cli import main

if __name__ == "__main__":
    sys.exit(main(["ui", *sys.argv[1:]]))
