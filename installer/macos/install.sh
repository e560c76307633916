#!/usr/bin/env bash
# Installs Garage for this macOS user: the app (its Node runtime, code and production dependencies),
# the `garage` command, and a launchd agent that runs `garage node` at login. Run it from a checkout
# after `npm install`. Running it again updates the app and the agent's settings. Bash 3.2 compatible
# (/bin/bash on macOS): no associative arrays, and empty arrays are expanded with ${a[@]+...}.
set -euo pipefail

readonly label=net.garage.node
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source_dir=$(cd "$here/../.." && pwd)
readonly here source_dir

usage() {
  cat <<'EOF'
Usage: installer/macos/install.sh [options]

Installs Garage for this user: the app in ~/.local/lib/garage, the `garage` command in ~/.local/bin,
and the launchd agent ~/Library/LaunchAgents/net.garage.node.plist that runs `garage node` at login
(data in ~/Library/Application Support/Garage, log in ~/Library/Logs/Garage/node.log).
Then it runs `garage doctor`. Run it again to update the app or change the settings below.

Options:
  --authority ID         the federation authority's id (default: $GARAGE_AUTHORITY)
  --bootstrap MULTIADDR  a bootstrap node, repeatable (default: $GARAGE_BOOTSTRAP, comma-separated)
  --region NAME          join this region instead of the nearest
  --prefix DIR           where the app goes (default: ~/.local/lib/garage)
  --bin-dir DIR          where the `garage` command goes (default: ~/.local/bin)
  --data-dir DIR         the node's data (default: ~/Library/Application Support/Garage)
  --no-start             write the agent but do not start it now (it starts at the next login)
  -h, --help             this text

Without an authority and a bootstrap node the app is installed but no agent is written.
EOF
}

die() {
  printf 'install.sh: %s\n' "$1" >&2
  exit 1
}

usage_error() {
  printf 'install.sh: %s\n\n' "$1" >&2
  usage >&2
  exit 2
}

prefix="$HOME/.local/lib/garage"
bin_dir="$HOME/.local/bin"
data_dir="$HOME/Library/Application Support/Garage"
log_dir="$HOME/Library/Logs/Garage"
agents_dir="$HOME/Library/LaunchAgents"
authority="${GARAGE_AUTHORITY:-}"
bootstrap=()
region=""
start=1

while [ $# -gt 0 ]; do
  case "$1" in
    --authority | --bootstrap | --region | --prefix | --bin-dir | --data-dir)
      if [ $# -lt 2 ] || [ -z "$2" ]; then usage_error "$1 needs a value"; fi
      case "$1" in
        --authority) authority="$2" ;;
        --bootstrap) bootstrap+=("$2") ;;
        --region) region="$2" ;;
        --prefix) prefix="$2" ;;
        --bin-dir) bin_dir="$2" ;;
        --data-dir) data_dir="$2" ;;
      esac
      shift 2
      ;;
    --no-start)
      start=0
      shift
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) usage_error "unknown option: $1" ;;
  esac
done

if [ ${#bootstrap[@]} -eq 0 ] && [ -n "${GARAGE_BOOTSTRAP:-}" ]; then
  IFS=',' read -r -a bootstrap <<<"$GARAGE_BOOTSTRAP"
fi

[ "$(uname -s)" = Darwin ] || die "this installer is for macOS; on Linux use installer/linux/install.sh"
for dir in prefix bin_dir data_dir; do
  case "${!dir}" in
    /*) ;;
    *) usage_error "--${dir//_/-} must be an absolute path, not ${!dir}" ;;
  esac
done
prefix="${prefix%/}"
# The prefix is replaced as a whole: never one that holds anything but a Garage install.
if [ -d "$prefix" ] && [ ! -f "$prefix/install.env" ] && [ -n "$(ls -A "$prefix")" ]; then
  die "$prefix is not empty and not a Garage install: choose a new --prefix"
fi
launcher_mark="# garage: written by Garage's installer/macos/install.sh"
if [ -e "$bin_dir/garage" ] && ! grep -qxF "$launcher_mark" "$bin_dir/garage"; then
  die "$bin_dir/garage exists and is not Garage's launcher: move it away or choose another --bin-dir"
fi
node_src="$source_dir/node_modules/node/bin/node"
if [ ! -x "$node_src" ] || [ ! -f "$source_dir/node_modules/.package-lock.json" ]; then
  die "no Node runtime in $source_dir/node_modules: run 'npm install' there first"
fi

uid=$(id -u)
domain="gui/$uid"
plist="$agents_dir/$label.plist"
log_file="$log_dir/node.log"

# The running agent uses the files about to be replaced: stop it first (it drains, then exits).
launchctl bootout "$domain/$label" 2>/dev/null || true

echo "Installing Garage into $prefix"
staging="$prefix.new"
rm -rf "$staging"
mkdir -p "$staging/node/bin"
cp "$node_src" "$staging/node/bin/node"
cp "$source_dir/package.json" "$staging/"
for dir in bin cli core containers mesh routing openai daemon bootstrap federation; do
  cp -R "$source_dir/$dir" "$staging/$dir"
done
# Production dependencies, as `npm ls --omit=dev` lists them, read from npm's own record of what
# it installed (no npm needed); a package's nested node_modules come with it.
# shellcheck disable=SC2016 # JavaScript, not shell
"$node_src" -e '
  const { existsSync, readFileSync } = require("node:fs")
  const root = process.argv[1]
  const lock = JSON.parse(readFileSync(`${root}/node_modules/.package-lock.json`, "utf8"))
  const copied = []
  for (const path of Object.keys(lock.packages).sort()) {
    const entry = lock.packages[path]
    if (!path.startsWith("node_modules/") || entry.dev || entry.link || !existsSync(`${root}/${path}`)) continue
    if (copied.some((p) => path.startsWith(`${p}/node_modules/`))) continue
    copied.push(path)
    process.stdout.write(`${path}\0`)
  }' "$source_dir" >"$staging/.packages"
while IFS= read -r -d '' package; do
  mkdir -p "$staging/$(dirname "$package")"
  cp -R "$source_dir/$package" "$staging/$package"
done <"$staging/.packages"
rm "$staging/.packages"

# What uninstall.sh removes besides the app itself.
{
  printf 'BIN_DIR=%q\n' "$bin_dir"
  printf 'DATA_DIR=%q\n' "$data_dir"
  printf 'LOG_DIR=%q\n' "$log_dir"
  printf 'PLIST=%q\n' "$plist"
} >"$staging/install.env"

rm -rf "$prefix"
mv "$staging" "$prefix"

# Single quotes for sh, with any ' inside written as '\''.
sh_quote() {
  printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"
}

mkdir -p "$bin_dir"
cat >"$bin_dir/garage" <<EOF
#!/bin/sh
$launcher_mark
if [ -z "\${GARAGE_DATA_DIR:-}" ]; then GARAGE_DATA_DIR=$(sh_quote "$data_dir"); fi
export GARAGE_DATA_DIR
exec $(sh_quote "$prefix/node/bin/node") $(sh_quote "$prefix/bin/garage.js") "\$@"
EOF
chmod 755 "$bin_dir/garage"
echo "Installed the garage command: $bin_dir/garage"
case ":$PATH:" in
  *":$bin_dir:"*) ;;
  *) echo "  $bin_dir is not on your PATH: add it in ~/.zprofile: export PATH=\"$bin_dir:\$PATH\"" ;;
esac

mkdir -p "$data_dir" "$log_dir"
chmod 700 "$data_dir"

# Patterns below hold &, < and >: bash 5.2 would read & in a replacement as the match.
shopt -u patsub_replacement 2>/dev/null || true

xml_escape() {
  local s="$1"
  s="${s//&/&amp;}"
  s="${s//</&lt;}"
  s="${s//>/&gt;}"
  printf '%s' "$s"
}

render_plist() {
  local node_options="$1" line indent arg
  shift
  while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
      *@NODE_ARGS@*)
        indent="${line%%@NODE_ARGS@*}"
        for arg in ${@+"$@"}; do
          printf '%s<string>%s</string>\n' "$indent" "$(xml_escape "$arg")"
        done
        continue
        ;;
    esac
    line="${line//@NODE@/$(xml_escape "$prefix/node/bin/node")}"
    line="${line//@GARAGE_JS@/$(xml_escape "$prefix/bin/garage.js")}"
    line="${line//@DATA_DIR@/$(xml_escape "$data_dir")}"
    line="${line//@LOG_FILE@/$(xml_escape "$log_file")}"
    line="${line//@NODE_OPTIONS@/$(xml_escape "$node_options")}"
    printf '%s\n' "$line"
  done <"$here/$label.plist"
}

if [ -z "$authority" ] || [ ${#bootstrap[@]} -eq 0 ]; then
  rm -f "$plist"
  echo "Garage is installed but not set up to run: no authority or bootstrap node given."
  echo "  Run again with: installer/macos/install.sh --authority ID --bootstrap MULTIADDR"
else
  node_args=(--authority "$authority")
  for b in "${bootstrap[@]}"; do node_args+=(--bootstrap "$b"); done
  if [ -n "$region" ]; then node_args+=(--region "$region"); fi
  # The node's V8 flags are the daemon's own (daemon/launch.ts), as the tray app and benchmarks use.
  # shellcheck disable=SC2016 # JavaScript, not shell
  node_options=$("$prefix/node/bin/node" --input-type=module -e '
    const { pathToFileURL } = await import("node:url")
    const { daemonNodeOptions } = await import(pathToFileURL(process.argv[1]).href)
    process.stdout.write(daemonNodeOptions)' "$prefix/daemon/launch.ts")
  mkdir -p "$agents_dir"
  render_plist "$node_options" "${node_args[@]}" >"$plist.new"
  mv "$plist.new" "$plist"
  if command -v plutil >/dev/null; then plutil -lint "$plist" >/dev/null; fi
  echo "Wrote the launchd agent: $plist"
  if [ "$start" = 1 ]; then
    # An agent disabled earlier (launchctl disable) would refuse to load.
    launchctl enable "$domain/$label"
    launchctl bootstrap "$domain" "$plist"
    echo "Started it: launchctl print $domain/$label shows its state; log: $log_file"
  else
    echo "Not started (--no-start): it starts at your next login, or now with: launchctl bootstrap $domain '$plist'"
  fi
fi

echo
echo "Checking this Mac (garage doctor):"
if ! "$bin_dir/garage" doctor --data-dir "$data_dir"; then
  echo "garage doctor found something to fix: see the lines above."
fi
