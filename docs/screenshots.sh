#!/usr/bin/env bash
# Screenshots of the top of both reports for the README, in headless Chromium (Debian package
# `chromium`; CHROMIUM=... for another binary). Render the reports first: `make paper`, `make study`.
#   docs/screenshots.sh [PAPER_REPORT] [STUDY_REPORT]
set -euo pipefail
cd "$(dirname "$0")/.."
paper=${1:-outputs/paper/report.html}
study=${2:-outputs/default/report.html}
chromium=${CHROMIUM:-chromium}
size=${WINDOW_SIZE:-1280,1500}

shoot() {  # REPORT PNG
  if [ ! -f "$1" ]; then
    echo "docs/screenshots.sh: $1 not found (render it first: make paper / make study)" >&2
    exit 1
  fi
  local profile
  profile=$(mktemp -d)  # a new empty profile: no state, no first-run or sync traffic
  "$chromium" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync --hide-scrollbars \
    --user-data-dir="$profile" --window-size="$size" --screenshot="$PWD/$2" "file://$(realpath "$1")" \
    >/dev/null 2>&1
  rm -rf "$profile"
  echo "wrote $2 (top of $1)"
}

shoot "$paper" docs/report_paper_top.png
shoot "$study" docs/report_default_top.png
