#!/usr/bin/env bash
# `make test-hostile [HOSTILE_REV=<commit>] [HAZARDS="..."] [HOSTILE_TESTS="..."]`: the tests that met environment
# hazards (team issue #22), run from a fresh clone of <commit> (default HEAD) in the environments that broke them.
# HAZARDS (default: all of them) names which:
#   gpu-node       torch in the test process sees one GPU (tests/hostile/fake_gpu.py);
#   hidden-gpus    CUDA_VISIBLE_DEVICES="" (the common way to hide GPUs; it would hide gpu-node's fake GPU, so
#                  with both the tests run twice: with the fake GPU, then with the variable);
#   proxy          http_proxy/https_proxy=http://127.0.0.1:9 (nothing listens there), no no_proxy;
#   private-folder the clone inside a 0700 folder (a clone in root's home);
#   other-owner    the checkout owned by uid 65534 (a bind-mounted workspace, root running the tests);
#   dns-hijack     a resolver that answers for a nonexistent name (nonexistent.invalid -> 127.0.0.1, through an
#                  /etc/hosts of this run's own mount namespace);
#   short-window   a `chromium` first in PATH that opens 1400x700 instead of 1400x1000 (a laptop screen; larger
#                  fonts or a longer header do the same to the first screen).
# CI=true always: a skipped test fails the run. private-folder, other-owner and dns-hijack need root.
# tests/hostile/fake_gpu.py is the environment, not code under test: it is copied into an older clone without it.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
REV="${1:-HEAD}"
ALL="gpu-node hidden-gpus proxy private-folder other-owner dns-hijack short-window"
HAZARDS="${HAZARDS:-$ALL}"
VENV="$(cd "$REPO/.venv" && pwd -P)"
DEFAULT_TESTS="tests/test_gpu_paths.py tests/test_gpu_pool.py tests/test_download.py tests/test_datasets.py
    tests/test_browser.py tests/test_report.py tests/test_image_path.py::test_image_path_bench_prints_rates_against_the_decoder
    tests/test_workflow.py::test_a_skip_fails_the_suite_in_ci"
# shellcheck disable=SC2206  # test ids hold no spaces or glob characters: split on whitespace
TESTS=(${HOSTILE_TESTS:-$DEFAULT_TESTS})
has() { [[ " $HAZARDS " == *" $1 "* ]]; }
for h in $HAZARDS; do [[ " $ALL " == *" $h "* ]] || { echo "error: unknown hazard $h (known: $ALL)" >&2; exit 2; }; done
if [ "$(id -u)" != 0 ]; then
    for h in private-folder other-owner dns-hijack; do
        has "$h" && { echo "error: hazard $h needs root (leave it out of HAZARDS)" >&2; exit 2; }
    done
fi
git -C "$REPO" rev-parse --verify -q "$REV^{commit}" >/dev/null || { echo "error: $REV is not a commit" >&2; exit 2; }

work="$(mktemp -d /tmp/mixer-hostile-XXXXXX)"
trap 'rm -rf "$work"' EXIT
mkdir "$work/home" "$work/bin"
has private-folder && chmod 700 "$work/home"
clone="$work/home/clone"
git clone -q "$REPO" "$clone"
git -C "$clone" -c advice.detachedHead=false checkout -q "$(git -C "$REPO" rev-parse "$REV")"
ln -s "$VENV" "$clone/.venv"
[ -e "$clone/tests/hostile/fake_gpu.py" ] || {
    mkdir -p "$clone/tests/hostile"; cp "$REPO/tests/hostile/fake_gpu.py" "$clone/tests/hostile/"; }
has other-owner && chown -R 65534:65534 "$clone"

env_of() {  # the environment of one pass: $1 = with the fake GPU (1) or with CUDA_VISIBLE_DEVICES="" (0)
    local e=(env -u no_proxy -u NO_PROXY)  # env's options before its assignments
    [ "$1" = 1 ] && e+=(-u CUDA_VISIBLE_DEVICES)
    e+=(CI=true)
    [ "$1" = 0 ] && e+=(CUDA_VISIBLE_DEVICES=)
    has proxy && e+=(http_proxy=http://127.0.0.1:9 https_proxy=http://127.0.0.1:9 HTTP_PROXY=http://127.0.0.1:9
                     HTTPS_PROXY=http://127.0.0.1:9)
    if has short-window; then
        cat > "$work/bin/chromium" <<'EOF'
#!/usr/bin/env bash
args=()
for a in "$@"; do case "$a" in --window-size=*) args+=("--window-size=1400,700") ;; *) args+=("$a") ;; esac; done
exec /usr/bin/chromium "${args[@]}"
EOF
        chmod 755 "$work/bin/chromium"
        e+=(PATH="$work/bin:$PATH")
    fi
    printf '%s\n' "${e[@]}"
}

status=0
cd "$clone"
passes=()
has gpu-node && passes+=(1)
has hidden-gpus && passes+=(0)
[ ${#passes[@]} = 0 ] && passes=(none)
for pass in "${passes[@]}"; do
    mapfile -t environment < <(env_of "$pass")
    plugin=()
    [ "$pass" = 1 ] && plugin=(-p tests.hostile.fake_gpu)
    run=("${environment[@]}" "$clone/.venv/bin/python" -m pytest "${plugin[@]}" -p no:cacheprovider -q
         --basetemp="$work/pytest-$pass" "${TESTS[@]}")
    label=$([ "$pass" = 1 ] && echo "gpu-node" || ([ "$pass" = 0 ] && echo "hidden-gpus" || echo "no GPU hazard"))
    echo "== $(git -C "$REPO" rev-parse --short "$REV") under: $label; $(echo " $HAZARDS " | sed 's/ gpu-node / /; s/ hidden-gpus / /; s/^ *//; s/ *$//')"
    if has dns-hijack; then
        cp /etc/hosts "$work/hosts"
        echo "127.0.0.1 nonexistent.invalid" >> "$work/hosts"
        unshare -m bash -c 'mount --bind "$0" /etc/hosts && exec "$@"' "$work/hosts" "${run[@]}" || status=1
    else
        "${run[@]}" || status=1
    fi
done
exit $status
