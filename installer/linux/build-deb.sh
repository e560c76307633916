#!/usr/bin/env bash
# Builds dist/garage_<version>_<arch>.deb (`npm run package:deb`): install.sh stages the app in
# /usr/lib/garage, /usr/bin/garage, the three system units and /etc/garage/garage.env; this script
# adds the docs, the maintainer scripts and the control file, then runs dpkg-deb.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: build-deb.sh [--out DIR] [--no-gpu-backends] [--fast] [--source DIR]

Builds garage_<version>-1_<arch>.deb from this Garage tree (after npm install).

Options:
  --out DIR          where the .deb goes (default: dist/ in the source tree)
  --no-gpu-backends  leave node-llama-cpp's CUDA and Vulkan builds out (~600 MB): a CPU-only package
  --fast             gzip -1 instead of xz: a quick package for tests
  --source DIR       the Garage tree to package (default: the one this script is in)
  -h, --help         this text
EOF
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The staged tree's directories become the package's: 0755 whatever the caller's umask.
umask 022
say() { printf '==> %s\n' "$*"; }
die() {
  printf 'build-deb.sh: %s\n' "$*" >&2
  exit 1
}

out='' source_dir='' fast=false
install_flags=()
while (($# > 0)); do
  if [[ "$1" == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case "$1" in
    --no-gpu-backends) install_flags+=(--no-gpu-backends) ;;
    --fast) fast=true ;;
    -h | --help) usage; exit 0 ;;
    --out | --source)
      if (($# < 2)) || [[ -z "$2" ]]; then
        printf 'build-deb.sh: %s needs a value\n' "$1" >&2
        exit 2
      fi
      if [[ "$1" == --out ]]; then out="$2"; else source_dir="$2"; fi
      shift
      ;;
    *)
      printf 'build-deb.sh: unknown option %s\nRun build-deb.sh --help for the options.\n' "$1" >&2
      exit 2
      ;;
  esac
  shift
done
for tool in dpkg-deb dpkg strip gzip; do
  command -v "$tool" >/dev/null || die "$tool is missing: apt-get install dpkg-dev binutils"
done

source_dir="$(cd "${source_dir:-$here/../..}" && pwd)"
out="$(mkdir -p "${out:-$source_dir/dist}" && cd "${out:-$source_dir/dist}" && pwd)"
node="$source_dir/node_modules/node/bin/node"
[[ -x "$node" ]] || die "no Node.js runtime at $node: run npm install in $source_dir"
upstream="$("$node" -p 'JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")).version' "$source_dir/package.json")"
version="$upstream-1"
arch="$(dpkg --print-architecture)"
deb="$out/garage_${version}_${arch}.deb"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
root="$work/root"

bash "$here/install.sh" --system --destdir "$root" --source "$source_dir" --prefix /usr/lib/garage --bin-dir /usr/bin \
  --unit-dir /lib/systemd/system --config-dir /etc/garage --data-dir /var/lib/garage \
  --role node,bootstrap,federation "${install_flags[@]}"

say "Stripping the binaries and fixing file modes"
# Debian wants its binaries stripped: debug info is 18 MB of Node's 125, more of llama.cpp's.
find "$root/usr/lib/garage" -type f \( -name '*.so' -o -name '*.so.*' -o -name '*.node' \) \
  -exec strip --strip-unneeded --remove-section=.comment {} +
strip --strip-unneeded --remove-section=.comment "$root/usr/lib/garage/runtime/node"
"$node" "$here/lib/fix-modes.mjs" "$root/usr/lib/garage/app" | sed 's/^/    /'

say "Adding the docs and the maintainer scripts"
gzip -9n "$root/usr/share/man/man1/garage.1"
doc="$root/usr/share/doc/garage"
install -d -m 0755 "$doc" "$root/usr/share/lintian/overrides"
install -m 0644 "$here/debian/copyright" "$doc/copyright"
date="$(date -R -u -d "@${SOURCE_DATE_EPOCH:-$(date +%s)}")"
sed -e "s|@VERSION@|$version|g" -e "s|@UPSTREAM_VERSION@|$upstream|g" -e "s|@DATE@|$date|g" \
  "$here/debian/changelog" | gzip -9n >"$doc/changelog.Debian.gz"
chmod 0644 "$doc/changelog.Debian.gz"
install -m 0644 "$here/debian/lintian-overrides" "$root/usr/share/lintian/overrides/garage"

control="$root/DEBIAN"
install -d -m 0755 "$control"
for script in postinst prerm postrm; do install -m 0755 "$here/debian/$script" "$control/$script"; done
install -m 0644 "$here/debian/conffiles" "$control/conffiles"

# Depends from the ELF files' needs (dpkg-shlibdeps), leaving out the GPU back-ends: they load only
# where the user has CUDA or Vulkan, so their libraries are the user's to bring.
mapfile -t elves < <(find "$root/usr/lib/garage" -type f \( -name '*.so' -o -name '*.so.*' -o -name '*.node' \) \
  -not -path '*/@node-llama-cpp/*-cuda*' -not -path '*/@node-llama-cpp/*-vulkan*')
if command -v dpkg-shlibdeps >/dev/null; then
  mkdir -p "$work/shlibs/debian"
  printf 'Source: garage\n\nPackage: garage\nArchitecture: any\n' >"$work/shlibs/debian/control"
  libdirs=()
  for so in "${elves[@]}"; do libdirs+=("-l$(dirname "$so")"); done
  shlibs="$(cd "$work/shlibs" && dpkg-shlibdeps -O --warnings=0 "${libdirs[@]}" \
    "$root/usr/lib/garage/runtime/node" "${elves[@]}" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')"
else
  # Without dpkg-dev: what Node.js and the CPU llama.cpp build need on Debian 12.
  shlibs='libc6 (>= 2.34), libgcc-s1 (>= 3.3), libstdc++6 (>= 12)'
fi
installed_kib="$(du -sk --exclude=DEBIAN "$root" | cut -f1)"
sed -e "s|@VERSION@|$version|" -e "s|@ARCH@|$arch|" -e "s|@INSTALLED_SIZE@|$installed_kib|" \
  -e "s|@SHLIBS_DEPENDS@|$shlibs|" "$here/debian/control.in" >"$control/control"
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) >"$control/md5sums"
chmod 0644 "$control/control" "$control/md5sums"

if $fast; then compression=(-Zgzip -z1); else compression=(-Zxz); fi
say "Building $(basename "$deb") (dpkg-deb ${compression[*]})"
dpkg-deb --root-owner-group "${compression[@]}" --build "$root" "$deb" >/dev/null
say "Built $deb ($(du -h "$deb" | cut -f1), $((installed_kib / 1024)) MiB installed)"
