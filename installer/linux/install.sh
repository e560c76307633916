#!/usr/bin/env bash
# Installs Garage on Linux: its Node.js 22 runtime, code and production dependencies under a prefix,
# the `garage` command, a default config and the systemd units; then starts the node and runs
# `garage doctor`. Per user by default; --system (as root) for the whole machine. uninstall.sh
# undoes it from the manifest this script writes.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: install.sh [--system] [options]

Installs Garage for this user (or with --system, as root, for the machine), enables and starts the
garage-node service unless --no-start, then runs `garage doctor` and prints what is missing.

Options:
  --system             install for the machine: services run as the `garage` user (needs root)
  --prefix DIR         the app: Node.js runtime, code, dependencies
                       (default: ~/.local/lib/garage; --system: /opt/garage)
  --bin-dir DIR        where the `garage` command goes (default: ~/.local/bin; --system: /usr/local/bin)
  --data-dir DIR       identity, models, state (default: $XDG_DATA_HOME/garage, i.e. ~/.local/share/garage;
                       --system: /var/lib/garage)
  --config-dir DIR     where garage.env goes (default: $XDG_CONFIG_HOME/garage, i.e. ~/.config/garage;
                       --system: /etc/garage)
  --unit-dir DIR       systemd units (default: ~/.config/systemd/user; --system: /etc/systemd/system)
  --role LIST          services to install, comma-separated or repeated: node, bootstrap (a region's
                       bootstrap node and head), federation (the API gateway) (default: node)
  --authority ID       the federation authority the node trusts (written into a new garage.env)
  --bootstrap ADDR     a bootstrap node of the node's region, repeatable (written into a new garage.env)
  --no-start           install the units but neither enable nor start them
  --no-gpu-backends    leave out node-llama-cpp's CUDA and Vulkan builds (~600 MB): CPU only
  --node FILE          the Node.js 22.18+ binary to bundle (default: the source's node_modules/node)
  --source DIR         the Garage tree to install from (default: the one this script is in)
  --destdir DIR        stage every file under DIR for a package; no user, services or doctor
  -h, --help           this text
EOF
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# What this script creates is readable by the service user; the config and data get their own modes.
umask 022
say() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() {
  printf 'install.sh: %s\n' "$*" >&2
  exit 1
}
usage_error() {
  printf 'install.sh: %s\nRun install.sh --help for the options.\n' "$*" >&2
  exit 2
}

system=false start=true gpu=true
prefix='' bin_dir='' data_dir='' config_dir='' unit_dir='' node_bin='' source_dir='' destdir='' authority=''
roles=() bootstraps=()
while (($# > 0)); do
  if [[ "$1" == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case "$1" in
    --system) system=true ;;
    --no-start) start=false ;;
    --no-gpu-backends) gpu=false ;;
    -h | --help) usage; exit 0 ;;
    --prefix | --bin-dir | --data-dir | --config-dir | --unit-dir | --role | --authority | --bootstrap | --node | --source | --destdir)
      if (($# < 2)) || [[ -z "$2" ]]; then usage_error "$1 needs a value"; fi
      case "$1" in
        --prefix) prefix="$2" ;;
        --bin-dir) bin_dir="$2" ;;
        --data-dir) data_dir="$2" ;;
        --config-dir) config_dir="$2" ;;
        --unit-dir) unit_dir="$2" ;;
        --role) IFS=',' read -ra more <<<"$2" && roles+=("${more[@]}") ;;
        --authority) authority="$2" ;;
        --bootstrap) bootstraps+=("$2") ;;
        --node) node_bin="$2" ;;
        --source) source_dir="$2" ;;
        --destdir) destdir="$2" ;;
      esac
      shift
      ;;
    *) usage_error "unknown option $1" ;;
  esac
  shift
done

# --- settle the options -------------------------------------------------------------------------

if $system; then
  kind=system systemctl=(systemctl)
  prefix="${prefix:-/opt/garage}" bin_dir="${bin_dir:-/usr/local/bin}" data_dir="${data_dir:-/var/lib/garage}"
  config_dir="${config_dir:-/etc/garage}" unit_dir="${unit_dir:-/etc/systemd/system}"
  [[ -n "$destdir" || "$EUID" -eq 0 ]] || die "--system installs for the whole machine and needs root: run it with sudo"
else
  kind=user systemctl=(systemctl --user)
  [[ -n "${HOME:-}" ]] || die "HOME is not set: a per-user install goes under it (or use --system)"
  xdg_data="${XDG_DATA_HOME:-$HOME/.local/share}" xdg_config="${XDG_CONFIG_HOME:-$HOME/.config}"
  prefix="${prefix:-$HOME/.local/lib/garage}" bin_dir="${bin_dir:-$HOME/.local/bin}"
  data_dir="${data_dir:-$xdg_data/garage}" config_dir="${config_dir:-$xdg_config/garage}"
  unit_dir="${unit_dir:-$xdg_config/systemd/user}"
fi
((${#roles[@]} > 0)) || roles=(node)
declare -A seen_role=()
for role in "${roles[@]}"; do
  case "$role" in node | bootstrap | federation) seen_role[$role]=1 ;; *) usage_error "--role must be node, bootstrap or federation, not '$role'" ;; esac
done
roles=()
for role in node bootstrap federation; do [[ -z "${seen_role[$role]:-}" ]] || roles+=("$role"); done
for path in "$prefix" "$bin_dir" "$data_dir" "$config_dir" "$unit_dir"; do
  # These paths go into the launcher and the units, which split words on spaces and expand % and $.
  [[ "$path" =~ ^/[A-Za-z0-9._/+-]*[A-Za-z0-9._+-]$ ]] ||
    usage_error "'$path' must be an absolute path of letters, digits and ._/+- (and not end in /)"
done
for value in "$authority" "${bootstraps[@]}"; do
  [[ "$value" =~ ^[A-Za-z0-9._/:+=-]*$ ]] || usage_error "'$value' is not an authority id or a multiaddr"
done
if [[ -n "$destdir" ]]; then
  [[ "$destdir" == /* ]] || destdir="$PWD/$destdir"
  mkdir -p "$destdir"
  start=false
fi
source_dir="$(cd "${source_dir:-$here/../..}" && pwd)" || die "no source tree at ${source_dir:-$here/../..}"
[[ -f "$source_dir/package.json" && -f "$source_dir/package-lock.json" && -f "$source_dir/bin/garage.js" ]] ||
  die "$source_dir is not a Garage tree (no package.json, package-lock.json or bin/garage.js)"
[[ -d "$source_dir/node_modules" ]] || die "$source_dir has no node_modules: run npm install there first"
node_bin="${node_bin:-$source_dir/node_modules/node/bin/node}"
[[ -x "$node_bin" ]] ||
  die "no Node.js runtime at $node_bin: run npm install in $source_dir (the node devDependency), or pass --node FILE"
node_bin="$(readlink -f "$node_bin")"
node_version="$("$node_bin" -p 'process.versions.node' 2>/dev/null)" || die "$node_bin does not run"
IFS=. read -r node_major node_minor _ <<<"$node_version"
((node_major > 22 || (node_major == 22 && node_minor >= 18))) ||
  die "$node_bin is Node.js $node_version; Garage needs 22.18 or newer (pass --node FILE)"
version="$("$node_bin" -p 'JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")).version' \
  "$source_dir/package.json")"

# Paths as they will be on the machine; t() is where this run writes them (under --destdir, if any).
t() { printf '%s%s' "$destdir" "$1"; }
launcher="$bin_dir/garage"
man_page="$(dirname "$bin_dir")/share/man/man1/garage.1"
config_file="$config_dir/garage.env"
manifest="$prefix/install-manifest"
launcher_mark="# Garage's launcher, written by its installer."

# --- the manifest: what uninstall.sh removes ----------------------------------------------------

entries=()
record() { entries+=("$(printf '%s\t' "$@" | sed 's/\t$//')"); }
save_manifest() {
  [[ -z "$destdir" ]] || return 0
  {
    printf '# Garage install manifest: read by uninstall.sh. kind\tpath[\tdetail]\n'
    printf '%s\n' "${entries[@]}" | awk '!seen[$0]++'
  } >"$manifest.tmp"
  mv "$manifest.tmp" "$manifest"
}
# Creates DIR and its missing parents, recording each one made; MODE applies when DIR is new.
ensure_dir() {
  local dir="$1" mode="${2:-}" d="$1" missing=()
  while [[ "$d" != / && ! -d "$(t "$d")" ]]; do
    missing=("$d" "${missing[@]}")
    d="$(dirname "$d")"
  done
  for d in "${missing[@]}"; do
    mkdir "$(t "$d")"
    record dir "$d"
  done
  if [[ -n "$mode" ]] && ((${#missing[@]} > 0)); then chmod "$mode" "$(t "$dir")"; fi
}

upgrade=false
if [[ -f "$(t "$manifest")" ]]; then
  grep -q "^mode	$kind\$" "$(t "$manifest")" ||
    die "$prefix holds a Garage install of the other kind (--system or not): uninstall it first"
  upgrade=true
  mapfile -t entries < <(grep -v '^#' "$(t "$manifest")")
elif [[ -e "$(t "$prefix")" && -n "$(ls -A "$(t "$prefix")" 2>/dev/null)" ]]; then
  die "$prefix is not empty and holds no Garage install: choose another --prefix"
fi

# What an earlier install made and its uninstall left with the data: this install takes it over.
leftovers="$(t "$data_dir")/.garage-install-leftovers"
if [[ -z "$destdir" && -f "$leftovers" ]]; then mapfile -t -O "${#entries[@]}" entries < <(grep -v '^#' "$leftovers"); fi

if $upgrade; then say "Upgrading Garage to $version ($kind install) in $prefix"; else say "Installing Garage $version ($kind install) into $prefix"; fi
[[ -z "$destdir" ]] || note "staging under $destdir"
record mode "$kind"
ensure_dir "$prefix" 0755
record prefix "$prefix"
save_manifest
rm -f "$leftovers"

# --- the app: runtime, code, production dependencies ---------------------------------------------

app="$(t "$prefix")"
cleanup() { rm -rf "$app/app.new" "$app/runtime.new"; }
trap cleanup EXIT
cleanup
say "Copying the Node.js $node_version runtime"
mkdir -p "$app/runtime.new"
cp "$node_bin" "$app/runtime.new/node"
chmod 0755 "$app/runtime.new/node"

if $gpu; then say "Copying Garage's code and production dependencies (with the GPU back-ends)"; else say "Copying Garage's code and production dependencies (CPU only: --no-gpu-backends)"; fi
mkdir -p "$app/app.new"
files_flag=()
$gpu || files_flag=(--no-gpu-backends)
"$node_bin" "$here/lib/prod-files.mjs" "$source_dir" "${files_flag[@]}" |
  (cd "$source_dir" && tar --null --no-recursion -T - -cf -) |
  (cd "$app/app.new" && tar -xf - --no-same-owner)
# Modes as a package wants them, whatever the umask of the tree they came from.
chmod -R u+w,go-w,a+rX "$app/app.new"
rm -rf "$app/app" "$app/runtime"
mv "$app/app.new" "$app/app"
mv "$app/runtime.new" "$app/runtime"
# uninstall.sh beside the manifest: it finds the install it belongs to without the source tree.
[[ -n "$destdir" ]] || install -m 0755 "$here/uninstall.sh" "$app/uninstall.sh"
note "$(du -sh "$app" | cut -f1) in $prefix"

# --- the garage command and its man page ---------------------------------------------------------

say "Writing the garage command: $launcher"
ensure_dir "$bin_dir"
if [[ -e "$(t "$launcher")" ]] && ! grep -qF "$launcher_mark" "$(t "$launcher")"; then
  die "$launcher exists and is not Garage's launcher: remove it or choose another --bin-dir"
fi
cat >"$(t "$launcher").tmp" <<EOF
#!/bin/sh
$launcher_mark The bundled Node.js runs the installed CLI.
GARAGE_DATA_DIR="\${GARAGE_DATA_DIR:-$data_dir}"
export GARAGE_DATA_DIR
exec $prefix/runtime/node $prefix/app/bin/garage.js "\$@"
EOF
chmod 0755 "$(t "$launcher").tmp"
mv "$(t "$launcher").tmp" "$(t "$launcher")"
record file "$launcher"
ensure_dir "$(dirname "$man_page")"
install -m 0644 "$here/garage.1" "$(t "$man_page")"
record file "$man_page"
save_manifest

# --- the service user and the data dir -----------------------------------------------------------

if $system && [[ -z "$destdir" ]]; then
  if ! getent passwd garage >/dev/null; then
    say "Creating the system user garage (home: $data_dir)"
    # No /etc/subuid range for a system user: that is what lets the unit's rootless Podman start.
    useradd --system --user-group --home-dir "$data_dir" --no-create-home --shell /usr/sbin/nologin \
      --comment 'Garage services' garage
    record user garage
    save_manifest
  fi
  # GPUs: /dev/dri render nodes belong to these groups.
  for group in video render; do
    if getent group "$group" >/dev/null; then usermod -a -G "$group" garage; fi
  done
fi
if [[ -z "$destdir" ]]; then
  if [[ ! -d "$data_dir" ]]; then say "Creating the data dir $data_dir"; fi
  if $system; then ensure_dir "$data_dir" 0750; else ensure_dir "$data_dir" 0700; fi
  if $system; then chown garage:garage "$data_dir"; fi
  record data "$data_dir"
  save_manifest
fi

# --- config -------------------------------------------------------------------------------------

if $system; then ensure_dir "$config_dir" 0755; else ensure_dir "$config_dir" 0700; fi
if [[ -e "$(t "$config_file")" ]]; then
  say "Keeping the config $config_file"
  if [[ -n "$authority" || ${#bootstraps[@]} -gt 0 ]]; then
    note "--authority and --bootstrap go into a new config only: set GARAGE_NODE_ARGS in $config_file"
  fi
  # Not written by this install: uninstall.sh removes it only with --purge.
  printf '%s\n' "${entries[@]}" | grep -q '^config	' || record config "$config_file" -
else
  say "Writing the default config $config_file"
  node_args=''
  [[ -z "$authority" ]] || node_args="--authority $authority"
  for b in "${bootstraps[@]}"; do node_args="${node_args:+$node_args }--bootstrap $b"; done
  sed -e "s|@DATA_DIR@|$data_dir|g" -e "s|@CONFIG_DIR@|$config_dir|g" -e "s|@NODE_ARGS@|$node_args|g" \
    -e "s|@SYSTEMCTL@|${systemctl[*]}|g" "$here/garage.env.in" >"$(t "$config_file").tmp"
  if $system; then chmod 0644 "$(t "$config_file").tmp"; else chmod 0600 "$(t "$config_file").tmp"; fi
  mv "$(t "$config_file").tmp" "$(t "$config_file")"
  # Its checksum: uninstall.sh keeps the file once someone has edited it.
  record config "$config_file" "$(sha256sum "$(t "$config_file")" | cut -d' ' -f1)"
  save_manifest
fi

# --- systemd units ------------------------------------------------------------------------------

ensure_dir "$unit_dir"
units=()
for role in "${roles[@]}"; do
  unit="garage-$role.service"
  units+=("$unit")
  say "Writing the $kind unit $unit_dir/$unit"
  if [[ -e "$(t "$unit_dir/$unit")" ]] && ! grep -q "^# Written by Garage's installer" "$(t "$unit_dir/$unit")"; then
    die "$unit_dir/$unit exists and was not written by Garage's installer: remove it first"
  fi
  bash "$here/render-unit.sh" --kind "$kind" --launcher "$launcher" --data-dir "$data_dir" --config "$config_file" \
    "$here/units/$unit.in" >"$(t "$unit_dir/$unit").tmp"
  chmod 0644 "$(t "$unit_dir/$unit").tmp"
  mv "$(t "$unit_dir/$unit").tmp" "$(t "$unit_dir/$unit")"
  record unit "$unit_dir/$unit" "$unit"
  save_manifest
done

if [[ -n "$destdir" ]]; then
  say "Staged Garage $version under $destdir"
  exit 0
fi

# --- start -----------------------------------------------------------------------------------------

# Whether a unit has its options: GARAGE_<ROLE>_ARGS is set in the config.
configured() {
  local var
  var="GARAGE_$(tr '[:lower:]' '[:upper:]' <<<"$1")_ARGS"
  grep -Eq "^${var}=.*[^[:space:]]" "$config_file"
}
later="${systemctl[*]} daemon-reload && ${systemctl[*]} enable --now ${units[*]}"
if ! $start; then
  say "Not starting the services (--no-start). Later: $later"
elif ! command -v systemctl >/dev/null; then
  say "systemctl is not installed: start Garage yourself with: $launcher node \$GARAGE_NODE_ARGS"
elif { $system && [[ ! -d /run/systemd/system ]]; } || { ! $system && ! systemctl --user show-environment >/dev/null 2>&1; }; then
  if $system; then say "systemd is not running here. Once it is: $later"; else say "No systemd user session here (no user bus). In one: $later"; fi
else
  say "Enabling ${units[*]}"
  "${systemctl[@]}" daemon-reload
  "${systemctl[@]}" enable --quiet "${units[@]}"
  for unit in "${units[@]}"; do
    role="${unit#garage-}" role="${role%.service}"
    if configured "$role"; then
      say "Starting $unit"
      "${systemctl[@]}" restart "$unit" || note "$unit did not start: journalctl ${systemctl[*]:1} -u $unit"
    else
      say "Not starting $unit yet: set GARAGE_$(tr '[:lower:]' '[:upper:]' <<<"$role")_ARGS in $config_file, then: ${systemctl[*]} restart $unit"
    fi
  done
  if ! $system && command -v loginctl >/dev/null && [[ "$(loginctl show-user "$USER" -P Linger 2>/dev/null)" != yes ]]; then
    note "the node runs while you are logged in; to keep it running after logout: loginctl enable-linger $USER"
  fi
fi

# --- doctor -------------------------------------------------------------------------------------

say "Checking the installed copy: $("$launcher" --version)"
say "Checking this machine (garage doctor)"
doctor=("$launcher" doctor)
# The services' view, and no root-owned files in their data dir.
! $system || doctor=(runuser -u garage -- "${doctor[@]}")
status=0
(cd / && "${doctor[@]}") || status=$?
case "$status" in
  0) say "Garage $version is installed and this machine can serve" ;;
  1) say "Garage $version is installed; this machine cannot serve yet: the fixes are listed above" ;;
  *) die "the installed garage doctor failed (exit $status): the install in $prefix is broken" ;;
esac
case ":$PATH:" in *":$bin_dir:"*) ;; *) note "add $bin_dir to your PATH to run garage" ;; esac
note "config $config_file, data $data_dir"
note "uninstall: $prefix/uninstall.sh (--purge also removes the data and config)"
