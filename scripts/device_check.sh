#!/usr/bin/env bash
# One command for a GPU machine: the Pallas kernel tests compiled for the device, the kernel
# benchmark, an offline engine run and a short serving run against `jaxserve serve`, all
# written to one folder. Sized for < 10 minutes on one H100/H200 (random Llama-3-8B weights:
# a device machine may have no network to fetch a checkpoint; speed does not depend on them).
#
#   scripts/device_check.sh [--dry-run] [--out DIR] [--model SPEC] [--tp N] [--dp N]
#
# --dry-run: the same steps on CPU with a tiny random model, interpret-mode kernels and small
# sizes (~30 s; tests/test_bench_scripts.py runs it in CI).
# Every step's output goes to DIR/<step>.log (+ .json); DIR/summary.txt lists rc and seconds;
# server_metrics fails if a Pallas kernel fell back to the jnp reference (figures not the
# kernels' then).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=""
MODEL=""
TP=1
DP=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT=$2; shift ;;
    --model) MODEL=$2; shift ;;
    --tp) TP=$2; shift ;;
    --dp) DP=$2; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
OUT=${OUT:-out/device_check_$(date +%Y%m%d_%H%M%S)}
mkdir -p "$OUT"
PORT=${PORT:-8765}

if [ "$DRY" = 1 ]; then
  MODEL=${MODEL:-random:tiny}
  KERNEL_TESTS=(-k "default_tiles and gpu")  # interpret mode is slow: two cases
  BENCH_KERNELS=(--preset smollm2 --impl reference --batch 2 --context 256 --extend-tokens 64
    --iters 2 --warmup 1)
  OFFLINE=(--concurrency 1 4 --input-len 32 --output-len 16)
  SERVING=(--num-prompts 8 --concurrency 4 --prompt-format text --input-len 8 --output-len 16)
  ENGINE_TOML="num_pages = 256
[scheduler]
max_running_requests = 4
max_prefill_tokens = 64
prefill_buckets = [64]
decode_batch_buckets = []
max_model_len = 256"
else
  MODEL=${MODEL:-random:llama3-8b}
  KERNEL_TESTS=(-k "not tpu")  # every GPU case, the slow long-context ones included
  BENCH_KERNELS=(--preset llama3-8b --batch 8 --context 4096)
  OFFLINE=(--concurrency 1 16 64 --input-len 512 --output-len 128)
  SERVING=(--num-prompts 128 --concurrency 32 --input-len 256 --output-len 128)
  # One prefill bucket and one decode batch: 4 compiled programs (EXTEND, DECODE, MIXED, slot
  # permute), compiled once by the offline run and reused by the server (same shapes, same
  # persistent compilation cache), so num_pages is fixed rather than sized from free memory:
  # 16384 pages of 16 tokens = 32 GiB of bf16 KV for Llama-3-8B (+ 16 GiB of weights).
  ENGINE_TOML="num_pages = 16384
[scheduler]
max_running_requests = 64
max_prefill_tokens = 1024
prefill_buckets = [1024]
decode_batch_buckets = []
max_model_len = 4096"
fi
# The [cache] table opens with num_pages; the engine's own keys come first.
cat > "$OUT/engine.toml" <<EOF
model = "$MODEL"
tp = $TP
dp = $DP
[cache]
page_size = 16
$ENGINE_TOML
EOF

FAILED=0
step() {  # step NAME TIMEOUT_S CMD...: run, log, record rc and seconds, keep going on failure
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== $name: $*" | tee -a "$OUT/summary.txt"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  [ "$rc" = 0 ] || FAILED=1
  echo "   rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
  tail -n 3 "$OUT/$name.log" | sed 's/^/   | /'
}

step environment 60 bash -c 'nvidia-smi 2>/dev/null || echo "no nvidia-smi";
  python -c "import jax, jaxlib; print(jax.__version__, jaxlib.__version__, jax.devices())";
  git rev-parse HEAD; git status --short; pip list 2>/dev/null | grep -i -E "^(jax|flax)"'

step kernel_tests 180 env PYTHONPATH=scripts python -m pytest -q tests/test_kernels.py \
  -p pallas_on_device "${KERNEL_TESTS[@]}" --junitxml="$OUT/kernel_tests.xml"

step bench_kernels 90 python scripts/bench_kernels.py "${BENCH_KERNELS[@]}" \
  --out "$OUT/bench_kernels.json"

step bench_offline 360 python scripts/bench_offline.py --config "$OUT/engine.toml" \
  --model "$MODEL" "${OFFLINE[@]}" --out "$OUT/bench_offline.json"

# Serving: start the server, wait for /health, drive it, stop it (SIGINT drains it).
python -m jaxserve.cli serve --config "$OUT/engine.toml" --port "$PORT" \
  > "$OUT/serve.log" 2>&1 &
SERVER=$!
step wait_for_server 180 python - "$PORT" "$SERVER" <<'EOF'
import os, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
while True:
    try:
        os.kill(pid, 0)  # the server died: fail now, its log says why
    except OSError:
        sys.exit("server exited; see serve.log")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            if r.status == 200:
                print("healthy"); break
    except OSError:
        pass
    time.sleep(1)
EOF
step bench_serving 120 python scripts/bench_serving.py --base-url "http://127.0.0.1:$PORT/v1" \
  "${SERVING[@]}" --ignore-eos --no-progress --out "$OUT/bench_serving.json"
# The server's counters, and whether every step ran the Pallas kernels: a kernel the device's
# compiler rejected falls back to the jnp reference (one warning in serve.log), and then the
# figures above are the reference's, not the kernels'.
step server_metrics 30 python - "$PORT" "$OUT/metrics.txt" <<'EOF'
import sys, urllib.request
port, path = sys.argv[1], sys.argv[2]
text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
open(path, "w").write(text)
values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
          if line.startswith("jaxserve_") and " " in line}
for name in ("jaxserve_kernel_fallbacks_total", "jaxserve_compiles_total",
             "jaxserve_step_functions"):
    print(name, values.get(name))
if values.get("jaxserve_kernel_fallbacks_total", 0) > 0:
    sys.exit("Pallas kernels fell back to the jnp reference: see serve.log")
EOF
kill -INT "$SERVER" 2>/dev/null
for _ in $(seq 30); do kill -0 "$SERVER" 2>/dev/null || break; sleep 1; done
kill -KILL "$SERVER" 2>/dev/null
wait "$SERVER" 2>/dev/null

echo "== results in $OUT (failed: $FAILED)" | tee -a "$OUT/summary.txt"
exit "$FAILED"
