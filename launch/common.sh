# Shared by the launch scripts (sourced, not run): argument parsing, shell quoting and --dry-run.
#
# Every script takes its own --key=value options, --dry-run, --skip-setup, --help, --module=jax_implicit.X
# (the command to run; default jax_implicit.train, the one multi-host command: the others run as one
# process), and that command's own arguments (--config=configs/... first, then any --config.a.b=v
# overrides), which are passed through unchanged. --dry-run first checks those arguments here, with the
# command's own parser (config file, config string, every key and value type), then prints what would run.

set -euo pipefail

DRY_RUN=0
SKIP_SETUP=0
MODULE=jax_implicit.train
CMD_ARGS=()
declare -A OPTS=()
PYTHON=.venv/bin/python

die() { echo "$(basename "$0"): $*" >&2; exit 2; }

# usage: the script's header comment (everything after the shebang up to the first line of code).
usage() { sed -n '2,/^[^#]/p' "$0" | sed -e '/^#SBATCH/d' -e '/^[^#]/d' -e 's/^# \{0,1\}//'; exit 0; }

# check_command: the command's own parser validates its arguments on this machine, before anything remote.
check_command() {
  local py=$PYTHON
  [[ -x $py ]] || py=python3
  JAX_IMPLICIT_CHECK_ONLY=1 JAX_PLATFORMS=cpu "$py" -m "$MODULE" "${CMD_ARGS[@]}" >/dev/null \
    || die "the arguments of $MODULE do not check out (above); nothing was run"
}

# quote ARGS...: one shell-safe line (single quotes where needed), readable by sh and by Python's shlex.
quote() {
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  printf '%s' "${out[*]}"
}

# run ARGS...: print the command (dry run) or run it.
run() { if (( DRY_RUN )); then quote "$@"; echo; else "$@"; fi; }

# parse_args ALLOWED_KEYS... -- "$@": fills OPTS, CMD_ARGS, MODULE, DRY_RUN, SKIP_SETUP.
parse_args() {
  local allowed=() a
  while [[ $1 != -- ]]; do allowed+=("$1"); shift; done
  shift
  for a in "$@"; do
    case $a in
      -h | --help) usage ;;
      --dry-run) DRY_RUN=1 ;;
      --skip-setup) SKIP_SETUP=1 ;;
      --module=*)
        MODULE=${a#*=}
        [[ $MODULE =~ ^jax_implicit(\.[a-z_]+)+$ ]] || die "--module=$MODULE: expected jax_implicit.<command>" ;;
      --config=* | --config.*=*) CMD_ARGS+=("$a") ;;
      --*=*)
        local key=${a%%=*}; key=${key#--}
        [[ " ${allowed[*]} " == *" $key "* ]] || die "unknown option --$key (known: ${allowed[*]/#/--}, --dry-run, --skip-setup, --module=..., --config=...)"
        OPTS[$key]=${a#*=} ;;
      *) die "unexpected argument '$a': options are --key=value; command arguments start with --config" ;;
    esac
  done
  [[ ${#CMD_ARGS[@]} -gt 0 && ${CMD_ARGS[0]} == --config=* ]] \
    || die "the first command argument must be --config=configs/... (got: ${CMD_ARGS[*]:-nothing})"
  if (( DRY_RUN )); then check_command; fi
}

# require KEY...: options without a default.
require() { local k; for k in "$@"; do [[ -n ${OPTS[$k]:-} ]] || die "--$k=... is required"; done; }

# The command every script ends with (train by default).
module_command() { printf '%s' "$(quote "$PYTHON" -m "$MODULE" "${CMD_ARGS[@]}")"; }

# single_process: true for every command but training (one process per host, joined by jax.distributed).
single_process() { [[ $MODULE != jax_implicit.train ]]; }

# The set-up commands a fresh machine needs (EXTRA: the JAX build for its accelerator).
setup_command() {
  printf '%s' "python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e . $(quote "$1")"
}
