#!/usr/bin/env bash
# Removes what install.sh installed, as its manifest lists it: stops and disables the services, then
# removes the units, the garage command, the app, the config (unless edited) and the directories
# install.sh made. The data dir stays unless --purge, which removes the data, the config and the
# `garage` system user too.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: uninstall.sh [--system] [--prefix DIR] [--purge]

Removes a Garage install made by install.sh: everything its manifest (PREFIX/install-manifest)
lists. Keeps the data dir, and the config if you edited it, unless --purge.

Options:
  --system      the machine-wide install (needs root)
  --prefix DIR  where Garage was installed (default: this script's own directory when it is the
                installed copy; else ~/.local/lib/garage, or /opt/garage with --system)
  --purge       also remove the data dir (identity, models, state), the config and the garage user
  -h, --help    this text
EOF
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
say() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() {
  printf 'uninstall.sh: %s\n' "$*" >&2
  exit 1
}
usage_error() {
  printf 'uninstall.sh: %s\nRun uninstall.sh --help for the options.\n' "$*" >&2
  exit 2
}

system=false purge=false prefix=''
while (($# > 0)); do
  if [[ "$1" == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case "$1" in
    --system) system=true ;;
    --purge) purge=true ;;
    -h | --help) usage; exit 0 ;;
    --prefix)
      if (($# < 2)) || [[ -z "$2" ]]; then usage_error "--prefix needs a value"; fi
      prefix="$2"
      shift
      ;;
    *) usage_error "unknown option $1" ;;
  esac
  shift
done

if [[ -z "$prefix" && -f "$here/install-manifest" ]]; then
  prefix="$here"
elif [[ -z "$prefix" ]]; then
  if $system; then prefix=/opt/garage; else prefix="${HOME:?HOME is not set}/.local/lib/garage"; fi
fi
manifest="$prefix/install-manifest"
[[ -f "$manifest" ]] || die "no Garage install at $prefix (no install-manifest there): pass the --prefix it was installed with"
kind="$(awk -F'\t' '$1 == "mode" { print $2; exit }' "$manifest")"
case "$kind" in
  system) system=true systemctl=(systemctl) ;;
  user) system=false systemctl=(systemctl --user) ;;
  *) die "$manifest names no install kind: it is not a manifest install.sh wrote" ;;
esac
[[ "$kind" == user || "$EUID" -eq 0 ]] || die "$prefix is a machine-wide install: run this as root (sudo)"

# The manifest's lines, by kind: "kind<TAB>path[<TAB>detail]".
field() { awk -F'\t' -v k="$1" -v n="$2" '$1 == k { print $n }' "$manifest"; }
mapfile -t unit_files < <(field unit 2)
mapfile -t unit_names < <(field unit 3)
mapfile -t files < <(field file 2)
mapfile -t dirs < <(field dir 2)
config_file="$(field config 2)" config_sum="$(field config 3)"
data_dir="$(field data 2)"
created_user="$(field user 2)"

say "Removing Garage ($kind install) from $prefix"

if ((${#unit_names[@]} > 0)); then
  if command -v systemctl >/dev/null &&
    { { $system && [[ -d /run/systemd/system ]]; } || { ! $system && systemctl --user show-environment >/dev/null 2>&1; }; }; then
    say "Stopping and disabling ${unit_names[*]}"
    "${systemctl[@]}" disable --now --quiet "${unit_names[@]}" || note "systemctl could not stop every unit"
  else
    note "systemd is not reachable from here: nothing to stop"
  fi
  for unit in "${unit_files[@]}"; do
    # Enablement links systemctl could not remove (installed while systemd ran, removed while not).
    find "$(dirname "$unit")" -maxdepth 2 -path '*.wants/*' -name "$(basename "$unit")" -type l -delete 2>/dev/null || true
    rm -f "$unit"
  done
  if command -v systemctl >/dev/null; then "${systemctl[@]}" daemon-reload >/dev/null 2>&1 || true; fi
fi

say "Removing the garage command and the app"
for file in "${files[@]}"; do rm -f "$file"; done

if [[ -n "$config_file" && -f "$config_file" ]]; then
  if $purge || [[ "$(sha256sum "$config_file" | cut -d' ' -f1)" == "$config_sum" ]]; then
    rm -f "$config_file"
  else
    note "kept your edited config $config_file (--purge removes it)"
  fi
fi

if $purge && [[ -n "$created_user" ]] && getent passwd "$created_user" >/dev/null && command -v pkill >/dev/null; then
  # The services are stopped; what the user still runs is left over (rootless Podman's pause process,
  # say): it would hold files in the data dir and keep userdel from removing the user.
  pkill -KILL -u "$created_user" || true
  for ((tries = 50; tries > 0; tries--)); do
    pgrep -u "$created_user" >/dev/null || break
    sleep 0.1
  done
fi
if $purge && [[ -n "$created_user" ]] && getent passwd "$created_user" >/dev/null; then
  # What it left in the shared temporary places (rootless Podman's run dirs and lock file).
  find /tmp /var/tmp /dev/shm -mindepth 1 -maxdepth 1 -user "$created_user" -exec rm -rf {} + 2>/dev/null || true
fi
if $purge && [[ -n "$data_dir" ]]; then
  say "Removing the data dir $data_dir (--purge)"
  rm -rf "$data_dir"
fi
if $purge && [[ -n "$created_user" ]] && getent passwd "$created_user" >/dev/null; then
  say "Removing the system user $created_user (--purge)"
  userdel "$created_user"
  if getent group "$created_user" >/dev/null; then groupdel "$created_user"; fi
fi

# The app and the manifest last, so a run that stops half-way can be run again; only what install.sh
# put in the prefix (the prefix itself goes below if install.sh made it and it is empty now).
rm -rf "$prefix/app" "$prefix/runtime" "$prefix/app.new" "$prefix/runtime.new" "$prefix/uninstall.sh"
rm -f "$manifest"
# Directories install.sh created, deepest first, when nothing else lives in them now; the data dir
# stays unless --purge (its parents then stay too: they are not empty).
for ((i = ${#dirs[@]} - 1; i >= 0; i--)); do
  dir="${dirs[i]}"
  if ! $purge && [[ "$dir" == "$data_dir" ]]; then continue; fi
  rmdir "$dir" 2>/dev/null || true
done

if ! $purge && [[ -n "$data_dir" && -d "$data_dir" ]]; then
  # What is left and was made by install.sh goes with the data: a later install takes it over, so
  # its uninstall --purge still removes it.
  left="$data_dir/.garage-install-leftovers"
  {
    printf '# Made by a Garage install and left by uninstall.sh: install.sh takes these over.\n'
    for dir in "${dirs[@]}"; do if [[ -d "$dir" ]]; then printf 'dir\t%s\n' "$dir"; fi; done
    if [[ -f "$config_file" ]]; then printf 'config\t%s\t%s\n' "$config_file" "$config_sum"; fi
    if [[ -n "$created_user" ]] && getent passwd "$created_user" >/dev/null; then printf 'user\t%s\n' "$created_user"; fi
  } >"$left"
  say "Garage is removed; its data stays in $data_dir (uninstall.sh --purge would have removed it)"
else
  say "Garage is removed"
fi
