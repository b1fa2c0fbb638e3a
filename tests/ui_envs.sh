#!/usr/bin/env bash
# Runs the UI tests (tab smoke, WebUI adapter, browser) under both gradio lines the extension supports:
#   gradio 4.40.0 (Forge)  and  gradio 3.41.2 (AUTOMATIC1111 1.10.x, reForge).
# Each gets its own venv with --system-site-packages, so the installed torch / safetensors / scipy / lib_rebasin are
# reused and never reinstalled (gradio does not depend on torch). The pins are the hosts' own where they matter:
# gradio 4.40 needs huggingface_hub<1.0 (it imports HfFolder) and a fastapi of its time; gradio 3.41.2 is run with
# A1111 1.10.1's fastapi 0.94 / pydantic 1 / httpx 0.24. The browser test needs Debian's chromium (apt-get install
# chromium); playwright's own browser download is never used.
set -euo pipefail
cd "$(dirname "$0")/.."
VENVS=${REBASIN_UI_VENVS:-${TMPDIR:-/tmp}/lib_rebasin-ui-venvs}
PYTEST_ARGS=("$@")

make_env() {
    local name=$1; shift
    local py="$VENVS/$name/bin/python"
    if [ ! -x "$py" ]; then
        python -m venv --system-site-packages "$VENVS/$name"
    fi
    local torch_before
    torch_before=$("$py" -c "import torch; print(torch.__version__)")
    "$py" -m pip install -q --disable-pip-version-check "$@"
    local torch_after
    torch_after=$("$py" -c "import torch; print(torch.__version__)")
    if [ "$torch_before" != "$torch_after" ]; then
        echo "ui_envs.sh: installing $name changed torch ($torch_before -> $torch_after); refusing to go on" >&2
        exit 1
    fi
}

make_env gradio4 "gradio==4.40.0" "huggingface_hub<1.0" "fastapi==0.104.1" "pydantic==2.8.2" "playwright"
make_env gradio3 "gradio==3.41.2" "gradio-client==0.5.0" "fastapi==0.94.0" "starlette==0.26.1" "pydantic==1.10.17" \
    "httpx==0.24.1" "httpcore==0.17.3" "numpy==1.26.4" "huggingface_hub==0.24.6" "pillow==9.5.0" "pandas<2.3" \
    "matplotlib<3.10" "websockets==11.0.3" "uvicorn==0.30.6" "altair==5.3.0" "playwright"

status=0
for env in gradio4 gradio3; do
    echo "== UI tests under $("$VENVS/$env/bin/python" -c 'import gradio; print("gradio", gradio.__version__)')"
    "$VENVS/$env/bin/python" -m pytest -p no:cacheprovider -m "not full" -W ignore::DeprecationWarning \
        tests/test_ui_smoke.py tests/test_webui_adapter.py tests/test_ui_blocks.py tests/test_browser.py "${PYTEST_ARGS[@]}" || status=$?
done
exit $status
