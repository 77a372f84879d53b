# Shared helpers of the scripts in scripts/. Source it, do not run it:
#   source "$(dirname "$0")/lib.sh"      (or `source scripts/lib.sh` from the repository root)
# Every message goes to stderr, so a script whose stdout is read (scripts/services) can use it.

# need_pkg CMD PKG...: make sure the command CMD exists, installing the Debian packages PKG...
# with apt-get when it does not (through sudo when not root). When the install fails, runs
# `apt-get update` once and tries again. Returns 1, with a message naming CMD and PKG..., when
# CMD is still missing; returns 0 at once when CMD is already there.
need_pkg() {
  if [ $# -lt 2 ]; then
    echo "need_pkg: usage: need_pkg CMD PKG... (got: $*)" >&2
    return 2
  fi
  local cmd=$1
  shift
  command -v "$cmd" >/dev/null 2>&1 && return 0
  local sudo=()
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
      sudo=(sudo)
    else
      echo "$cmd is missing, and neither root nor sudo is available to install the Debian package(s) $*" >&2
      return 1
    fi
  fi
  local apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get)
  local log
  log=$(mktemp)
  echo "installing Debian package(s) $* (for $cmd)" >&2
  if ! "${apt[@]}" install -y -qq --no-install-recommends "$@" >"$log" 2>&1; then
    echo "apt-get install $* failed; running apt-get update and trying once more" >&2
    if ! { "${apt[@]}" update -qq && "${apt[@]}" install -y -qq --no-install-recommends "$@"; } >"$log" 2>&1; then
      tail -n 20 "$log" | sed 's/^/  apt-get: /' >&2
      rm -f "$log"
      echo "could not install the Debian package(s) $* (for $cmd)" >&2
      return 1
    fi
  fi
  rm -f "$log"
  if ! command -v "$cmd" >/dev/null 2>&1; then
    echo "installed the Debian package(s) $*, but $cmd is still not on PATH" >&2
    return 1
  fi
}

# need_venv: print the path of the Python of the scripts' virtualenv, creating it (or recreating
# it when scripts/requirements.txt changed) first. One virtualenv and one list of pins for every
# Python tool here: helm/bulwark/ci/check.py (scripts/check-helm) and scripts/ops_lint.py
# (scripts/check-ops).
# Env: BULWARK_VENV (default .venv-helm in the repository root; CHECK_HELM_VENV is still
#      honoured), PYTHON (the interpreter to create it with, default python3).
need_venv() {
  local root
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  local venv=${BULWARK_VENV:-${CHECK_HELM_VENV:-$root/.venv-helm}}
  case $venv in /*) ;; *) venv=$root/$venv ;; esac
  local req=$root/scripts/requirements.txt
  local python=${PYTHON:-python3}
  [ -f "$req" ] || { echo "need_venv: $req is missing" >&2; return 1; }
  local want
  want=$(sha256sum "$req" | cut -d' ' -f1)
  if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.requirements-sha256" 2>/dev/null)" != "$want" ]; then
    echo "=== creating $venv from scripts/requirements.txt" >&2
    "$python" -m venv --clear "$venv" >&2 || { echo "need_venv: $python -m venv $venv failed" >&2; return 1; }
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req" >&2 ||
      { echo "need_venv: pip install -r scripts/requirements.txt into $venv failed" >&2; return 1; }
    echo "$want" >"$venv/.requirements-sha256"
  fi
  echo "$venv/bin/python"
}

# modules_of BIN [DIR]: print the modules compiled into the Bulwark binary BIN, space-separated,
# in start order, as `BIN modules` lists them (one name a line, nothing else on stdout;
# app/src/modules.rs is the only list of modules). Runs it in DIR (default: a new temporary
# directory) without BULWARK_CONFIG or BULWARK__* from the caller's environment. Returns 1, with
# a message naming BIN and the offending line, when the command fails or prints something that is
# not a module name (lowercase letters, digits, _ and -) or a name twice.
modules_of() {
  local bin=$1 dir=${2:-} own=
  case $bin in /*) ;; */*) bin=$PWD/$bin ;; esac   # it runs in DIR
  if [ -z "$dir" ]; then dir=$(mktemp -d); own=1; fi
  local out err rc=0
  err=$(mktemp)
  out=$(
    cd "$dir" && unset BULWARK_CONFIG && while IFS= read -r v; do unset "$v"; done < <(compgen -e | grep '^BULWARK__' || true)
    exec "$bin" modules 2>"$err"
  ) || rc=$?
  if [ "$rc" != 0 ]; then
    echo "\`$bin modules\` failed (exit $rc); it must print the compiled-in module names, one a line:" >&2
    tail -n 5 "$err" | sed 's/^/  /' >&2
    rm -f "$err"; [ -z "$own" ] || rm -rf "$dir"
    return 1
  fi
  rm -f "$err"; [ -z "$own" ] || rm -rf "$dir"
  local names=() line n=0
  [ -n "$out" ] || return 0   # no module compiled in
  while IFS= read -r line; do
    n=$((n + 1))
    if ! [[ $line =~ ^[a-z][a-z0-9_-]*$ ]]; then
      echo "\`$bin modules\` line $n: '$line' is not a module name (one name a line, nothing else on stdout)" >&2
      return 1
    fi
    if [[ " ${names[*]} " == *" $line "* ]]; then
      echo "\`$bin modules\` line $n: module '$line' listed twice" >&2
      return 1
    fi
    names+=("$line")
  done <<<"$out"
  echo "${names[*]}"
}
