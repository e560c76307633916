#!/usr/bin/env bash
# Renders one of installer/linux/units/*.service.in for a user or system instance of systemd, to
# stdout. install.sh and build-deb.sh (through install.sh) use it; so do the unit tests.
#
# Usage: render-unit.sh --kind user|system --launcher FILE --data-dir DIR --config FILE TEMPLATE
set -euo pipefail

kind='' launcher='' data_dir='' config='' template=''
while (($# > 0)); do
  case "$1" in
    --kind) kind="${2:-}"; shift 2 ;;
    --launcher) launcher="${2:-}"; shift 2 ;;
    --data-dir) data_dir="${2:-}"; shift 2 ;;
    --config) config="${2:-}"; shift 2 ;;
    -*) echo "render-unit.sh: unknown option $1" >&2; exit 2 ;;
    *) template="$1"; shift ;;
  esac
done
case "$kind" in
  user) drop='@system@' keep='@user@' ;;
  system) drop='@user@' keep='@system@' ;;
  *) echo "render-unit.sh: --kind must be user or system" >&2; exit 2 ;;
esac
[[ -f "$template" ]] || { echo "render-unit.sh: no template ${template:-given}" >&2; exit 2; }
for path in "$launcher" "$data_dir" "$config"; do
  # Unit files split words on spaces and expand % and $: paths stay plain so they need no quoting.
  if [[ ! "$path" =~ ^/[A-Za-z0-9._/+-]*$ ]]; then
    echo "render-unit.sh: ${path:-an empty path} must be absolute and use only letters, digits and ._/+-" >&2
    exit 2
  fi
done

unit="$(sed -e '/^##/d' -e "/^${drop}/d" -e "s|^${keep}||" \
  -e "s|@LAUNCHER@|${launcher}|g" -e "s|@DATA_DIR@|${data_dir}|g" -e "s|@CONFIG_FILE@|${config}|g" \
  "$template")"
if [[ "$unit" =~ @[A-Z_]+@ ]]; then
  echo "render-unit.sh: $template has a placeholder this script does not know: ${BASH_REMATCH[0]}" >&2
  exit 1
fi
printf '# Written by Garage'"'"'s installer. Settings go in %s, not here.\n%s\n' "$config" "$unit"
