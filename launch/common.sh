# Shared by the launch scripts (sourced, not run). `dry_run` is set by the sourcing script.
# shellcheck shell=bash

# Runs a command, or under --dry-run prints it for pasting (words quoted only where needed).
run() {
  # shellcheck disable=SC2154
  if ((dry_run)); then
    local word line=()
    for word in "$@"; do
      if [[ $word =~ ^[[:alnum:]_@%+=:,./-]+$ ]]; then line+=("$word"); else line+=("${word@Q}"); fi
    done
    echo "${line[*]}"
  else
    "$@"
  fi
}
