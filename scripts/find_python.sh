#!/usr/bin/env bash
# Prints the path of a Python >= 3.12 interpreter (LeRobot 0.6 needs it), or fails with a message.
# Looks at $PYTHON, python3.12/python3.13/python3 on PATH, then pyenv's installed versions
# (3.12 first: the version LeRobot's LIBERO stack is known to work with).
set -u
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; }
candidates=()
[ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
for name in python3.12 python3.13 python3; do
  command -v "$name" >/dev/null 2>&1 && candidates+=("$(command -v "$name")")
done
if command -v pyenv >/dev/null 2>&1; then
  root=$(pyenv root)
  for dir in $(ls -d "$root"/versions/3.12* 2>/dev/null | sort -rV) \
             $(ls -d "$root"/versions/3.1[3-9]* 2>/dev/null | sort -V); do
    candidates+=("$dir/bin/python3")
  done
fi
for py in "${candidates[@]}"; do
  if ok "$py"; then echo "$py"; exit 0; fi
done
echo "error: no Python >= 3.12 found (LeRobot 0.6 needs it). Install one (e.g. 'pyenv install 3.12') or set PYTHON=/path/to/python3.12." >&2
exit 1
