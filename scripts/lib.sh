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
