#!/usr/bin/env bash
# A headless-Chromium screenshot of the server's web page with a personalized user selected and a query answered
# (non-personalized and personalized side by side).
#
#   bash benchmarks/serve_screenshot.sh [OUT.png] [MODEL] [METHOD] [TASK]
#   e.g. bash benchmarks/serve_screenshot.sh runs/serve-page.png smollm2-135m rag lamp2n
#
# Needs Debian's chromium (apt-get install -y chromium); fails, and says so, without it. Everything runs on
# 127.0.0.1: a server with a fresh store in a temporary folder, three LaMP dev users added and personalized over
# HTTP, one screenshot, then the server is stopped. Extra server flags may be given in $SERVE_ARGS
# (e.g. SERVE_ARGS="--data-dir /path/to/lamp").
set -euo pipefail

OUT=${1:-runs/serve-page.png}
MODEL=${2:-smollm2-135m}
METHOD=${3:-rag}
TASK=${4:-lamp2n}
PYTHON=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python
CHROMIUM=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$CHROMIUM" ]; then
  echo "error: chromium is not installed (Debian: apt-get install -y chromium)" >&2
  exit 1
fi

WORK=$(mktemp -d)
SERVER_PID=
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

KEY=$("$PYTHON" -m tailor.cli serve --store "$WORK/store" --create-tenant demo 2>/dev/null)
PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# shellcheck disable=SC2086
"$PYTHON" -m tailor.cli serve --store "$WORK/store" --method "$METHOD" --task "$TASK" --model "$MODEL" \
  --host 127.0.0.1 --port "$PORT" ${SERVE_ARGS:-} > "$WORK/server.log" 2>&1 &
SERVER_PID=$!

FRAGMENT=$("$PYTHON" - "$PORT" "$KEY" "$TASK" ${SERVE_ARGS:-} <<'EOF'
import sys
import time
import urllib.parse

import httpx

from tailor.data.lamp import load_users

port, key, task, rest = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
data_dir = rest[rest.index("--data-dir") + 1] if "--data-dir" in rest else None
url = f"http://127.0.0.1:{port}"
for _ in range(600):  # up to 10 minutes: a first start may convert the packaged model
    try:
        if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
            break
    except httpx.TransportError:
        time.sleep(1)
else:
    sys.exit("the server did not start")
users = load_users(task, "dev", data_dir)[:3]
with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as api:
    for user in users:
        api.post(f"/v1/users/{user.id}/history",
                 json={"items": [item.to_json() for item in user.profile]}).raise_for_status()
        job = api.post(f"/v1/users/{user.id}/personalize").json()
        while job["status"] in ("queued", "running"):
            time.sleep(0.5)
            job = api.get(f"/v1/jobs/{job['job_id']}").json()
        if job["status"] != "done":
            sys.exit(f"personalize {user.id}: {job}")
print(urllib.parse.urlencode({"key": key, "user": users[0].id, "query": users[0].queries[0].input, "ask": 1},
                             quote_via=urllib.parse.quote))
EOF
)

mkdir -p "$(dirname "$OUT")"
"$CHROMIUM" --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,1000 \
  --virtual-time-budget=60000 --screenshot="$OUT" "http://127.0.0.1:$PORT/#$FRAGMENT" 2> "$WORK/chromium.log"
[ -s "$OUT" ] || { echo "error: no screenshot written; chromium said:" >&2; cat "$WORK/chromium.log" >&2; exit 1; }
echo "screenshot: $OUT"
