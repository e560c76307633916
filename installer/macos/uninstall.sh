#!/usr/bin/env bash
# Removes what installer/macos/install.sh installed: the launchd agent (stopped first), the app and
# the `garage` command. The node's data (its identity, models, settings) and its log stay unless
# --purge. Bash 3.2 compatible, like install.sh.
set -euo pipefail

readonly label=net.garage.node

usage() {
  cat <<'EOF'
Usage: installer/macos/uninstall.sh [--prefix DIR] [--purge]

Stops and removes the launchd agent net.garage.node, the app and the `garage` command.
Keeps ~/Library/Application Support/Garage (the node's identity, models, settings) and
~/Library/Logs/Garage unless --purge.

Options:
  --prefix DIR   where install.sh put the app (default: ~/.local/lib/garage)
  --purge        also delete the node's data and logs
  -h, --help     this text
EOF
}

die() {
  printf 'uninstall.sh: %s\n' "$1" >&2
  exit 1
}

usage_error() {
  printf 'uninstall.sh: %s\n\n' "$1" >&2
  usage >&2
  exit 2
}

prefix="$HOME/.local/lib/garage"
purge=0
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix)
      if [ $# -lt 2 ] || [ -z "$2" ]; then usage_error "--prefix needs a value"; fi
      prefix="${2%/}"
      shift 2
      ;;
    --purge)
      purge=1
      shift
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) usage_error "unknown option: $1" ;;
  esac
done

[ "$(uname -s)" = Darwin ] || die "this uninstaller is for macOS; on Linux use installer/linux/uninstall.sh"

# install.sh recorded where it put the rest; the defaults stand in when the app is already gone.
BIN_DIR="$HOME/.local/bin"
DATA_DIR="$HOME/Library/Application Support/Garage"
LOG_DIR="$HOME/Library/Logs/Garage"
PLIST="$HOME/Library/LaunchAgents/$label.plist"
if [ -f "$prefix/install.env" ]; then
  # shellcheck source=/dev/null # written by install.sh with printf %q
  . "$prefix/install.env"
elif [ -d "$prefix" ] && [ -n "$(ls -A "$prefix")" ]; then
  die "$prefix is not a Garage install (no install.env): nothing removed"
fi

# bootout sends SIGTERM and waits for the node to drain; it fails when the agent is not loaded.
launchctl bootout "gui/$(id -u)/$label" 2>/dev/null || true
rm -f "$PLIST"
if [ -f "$BIN_DIR/garage" ] && grep -qxF "# garage: written by Garage's installer/macos/install.sh" "$BIN_DIR/garage"; then
  rm -f "$BIN_DIR/garage"
fi
rm -rf "$prefix" "$prefix.new"
echo "Removed Garage: the agent $label, $prefix and $BIN_DIR/garage."

if [ "$purge" = 1 ]; then
  rm -rf "$DATA_DIR" "$LOG_DIR"
  echo "Deleted the node's data ($DATA_DIR) and logs ($LOG_DIR)."
else
  echo "Kept the node's data in $DATA_DIR and logs in $LOG_DIR (--purge deletes them)."
fi
