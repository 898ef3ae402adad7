#!/usr/bin/env bash
# `make test-hostile [HOSTILE_REV=<commit>]`: the tests that met environment hazards (team issue #22), run from a
# fresh clone of <commit> (default HEAD) in the environments that broke them, all at once:
#   - a GPU node: torch in the test process sees one GPU (tests/hostile/fake_gpu.py);
#   - GPUs hidden the common way: CUDA_VISIBLE_DEVICES="";
#   - an unreachable proxy: http_proxy/https_proxy=http://127.0.0.1:9, no no_proxy;
#   - a private home: the clone inside a 0700 folder;
#   - a checkout owned by another user (a bind-mounted workspace, root running the tests): chowned to uid 65534;
#   - a resolver that hijacks NXDOMAIN: nonexistent.invalid resolves to 127.0.0.1 (an /etc/hosts of this run's
#     own mount namespace);
#   - a short browser window (a laptop screen; larger fonts or a longer header do the same): a `chromium` first
#     in PATH that opens 1400x700 instead of 1400x1000;
#   - CI=true: a skipped test fails the run.
# The last four need root (chown, unshare, setpriv); without it they are left out and the run says so.
# tests/hostile/fake_gpu.py is the environment, not code under test: it is copied into an older clone without it.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
REV="${1:-HEAD}"
VENV="$(cd "$REPO/.venv" && pwd -P)"
TESTS=(tests/test_gpu_paths.py tests/test_gpu_pool.py tests/test_download.py tests/test_datasets.py
       tests/test_browser.py tests/test_report.py "tests/test_image_path.py::test_image_path_bench_prints_rates_against_the_decoder"
       "tests/test_workflow.py::test_a_skip_fails_the_suite_in_ci")

work="$(mktemp -d /tmp/mixer-hostile-XXXXXX)"
trap 'rm -rf "$work"' EXIT
git -C "$REPO" rev-parse --verify -q "$REV^{commit}" >/dev/null || { echo "error: $REV is not a commit" >&2; exit 2; }
mkdir "$work/private" "$work/bin"
chmod 700 "$work/private"
git clone -q "$REPO" "$work/private/clone"
git -C "$work/private/clone" -c advice.detachedHead=false checkout -q "$(git -C "$REPO" rev-parse "$REV")"
ln -s "$VENV" "$work/private/clone/.venv"
[ -e "$work/private/clone/tests/hostile/fake_gpu.py" ] || {
    mkdir -p "$work/private/clone/tests/hostile"; cp "$REPO/tests/hostile/fake_gpu.py" "$work/private/clone/tests/hostile/"; }
cat > "$work/bin/chromium" <<'EOF'
#!/usr/bin/env bash
args=()
for a in "$@"; do case "$a" in --window-size=*) args+=("--window-size=1400,700") ;; *) args+=("$a") ;; esac; done
exec /usr/bin/chromium "${args[@]}"
EOF
chmod 755 "$work/bin/chromium"

run=(env -u no_proxy -u NO_PROXY CI=true CUDA_VISIBLE_DEVICES= http_proxy=http://127.0.0.1:9
     https_proxy=http://127.0.0.1:9 HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 PATH="$work/bin:$PATH"
     "$work/private/clone/.venv/bin/python" -m pytest -p tests.hostile.fake_gpu -p no:cacheprovider -q
     --basetemp="$work/pytest" "${TESTS[@]}")
echo "hostile run of $(git -C "$REPO" rev-parse --short "$REV") in $work/private/clone (parent folder 0700)"
cd "$work/private/clone"
if [ "$(id -u)" = 0 ]; then
    chown -R 65534:65534 "$work/private/clone"
    cp /etc/hosts "$work/hosts"
    echo "127.0.0.1 nonexistent.invalid" >> "$work/hosts"
    echo "checkout owned by uid 65534; nonexistent.invalid resolves to 127.0.0.1"
    unshare -m bash -c 'mount --bind "$0" /etc/hosts && exec "$@"' "$work/hosts" "${run[@]}"
else
    echo "not root: the checkout stays yours, the resolver is the machine's (no chown, no mount namespace)"
    "${run[@]}"
fi
