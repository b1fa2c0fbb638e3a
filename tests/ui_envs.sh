#!/usr/bin/env bash
# Runs the UI tests (those marked `ui`: tab smoke, WebUI adapter, the HTTP API against real servers, browser) under
# both gradio lines the extension supports:
#   gradio 4.40.0 (Forge): the standalone app's own `[ui]` extra from pyproject.toml (what README installs), and
#   gradio 3.41.2 (AUTOMATIC1111 1.10.x, reForge): A1111 1.10.1's fastapi 0.94 / pydantic 1 / httpx 0.24.
# Each gets its own venv that reuses the running interpreter's packages (torch, safetensors, scipy, lib_rebasin),
# so they are never reinstalled (gradio does not depend on torch): --system-site-packages gives the *base*
# interpreter's site-packages, which inside a virtualenv is not where its torch is, so a .pth file also adds the
# running environment's own site-packages, after the child's (the child's pins win). In a system Python both are
# the same folders. The browser test needs Debian's chromium (apt-get install chromium); playwright's own browser
# download is never used.
set -euo pipefail
cd "$(dirname "$0")/.."
VENVS=${REBASIN_UI_VENVS:-${TMPDIR:-/tmp}/lib_rebasin-ui-venvs}
PYTEST_ARGS=("$@")
PARENT_PY=$(command -v python)

make_env() {
    local name=$1; shift
    local py="$VENVS/$name/bin/python"
    if [ ! -x "$py" ]; then
        "$PARENT_PY" -m venv --system-site-packages "$VENVS/$name"
    fi
    # addsitedir (not a bare path line) also runs the parent's own .pth files: editable installs, finders.
    local child_site
    child_site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    "$PARENT_PY" -c "
import site, sys
dirs = [d for d in site.getsitepackages() + [site.getusersitepackages()] if d]
print(''.join(f'import site; site.addsitedir({d!r})\\n' for d in dirs), end='')
" > "$child_site/_lib_rebasin_parent_env.pth"
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

# The [ui] extra's requirements as pyproject.toml lists them (not `-e .[ui]`: the venvs are shared between
# checkouts, and tests import lib_rebasin from the checkout they run in).
mapfile -t UI_REQUIREMENTS < <("$PARENT_PY" -c "
try:
    import tomllib
except ImportError:  # Python 3.10: lib_rebasin depends on tomli there
    import tomli as tomllib
with open('pyproject.toml', 'rb') as f:
    print('\\n'.join(tomllib.load(f)['project']['optional-dependencies']['ui']))
")
if [ ${#UI_REQUIREMENTS[@]} -eq 0 ]; then
    echo "ui_envs.sh: could not read the [ui] extra from pyproject.toml" >&2
    exit 1
fi
make_env gradio4 "${UI_REQUIREMENTS[@]}" "playwright"
make_env gradio3 "gradio==3.41.2" "gradio-client==0.5.0" "fastapi==0.94.0" "starlette==0.26.1" "pydantic==1.10.17" \
    "httpx==0.24.1" "httpcore==0.17.3" "numpy==1.26.4" "huggingface_hub==0.24.6" "pillow==9.5.0" "pandas<2.3" \
    "matplotlib<3.10" "websockets==11.0.3" "uvicorn==0.30.6" "altair==5.3.0" "playwright"

# The UI tests are the ones marked `ui` (pytest.mark.ui, or a module's pytestmark). Their files are found in the
# source rather than by collecting tests/ in each environment: the gradio 3 environment cannot import diffusers,
# which other test modules need, and the parent environment may not have gradio (CI's [test] extra does not).
mapfile -t UI_FILES < <(grep -lE 'pytest\.mark\.ui\b' tests/test_*.py)
if [ ${#UI_FILES[@]} -eq 0 ]; then
    echo "ui_envs.sh: no test file is marked ui" >&2
    exit 1
fi

# The two environments run at the same time: their tests mostly wait on servers and the browser, and each runs
# torch on one thread (conftest.py). Each run's output is shown whole once both have ended. `-o addopts=` drops the
# core suite's pytest-xdist workers (pyproject.toml): each environment runs its tests in one process.
LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT
pids=()
for env in gradio4 gradio3; do
    {
        echo "== UI tests under $("$VENVS/$env/bin/python" -c 'import gradio; print("gradio", gradio.__version__)')"
        "$VENVS/$env/bin/python" -m pytest -o addopts= -p no:cacheprovider -m "ui and not full" \
            -W ignore::DeprecationWarning "${UI_FILES[@]}" "${PYTEST_ARGS[@]}"
    } > "$LOGS/$env.log" 2>&1 &
    pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || status=$?
done
cat "$LOGS/gradio4.log" "$LOGS/gradio3.log"
exit $status
