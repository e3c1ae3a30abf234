#!/usr/bin/env bash
# Builds the operator image without Docker, from the release binary, as a
# docker-archive tarball (what `docker save` writes; `ctr images import` and
# `docker load` read it). Its contents are those of the Dockerfile's
# distroless result:
#   /usr/local/bin/mailauth-operator      the release binary
#   the shared libraries it links (ldd) and the dynamic loader
#   /etc/ssl/certs/ca-certificates.crt    this machine's CA bundle
#   /etc/passwd, /etc/group               root, nobody, nonroot (65532)
#   /etc/nsswitch.conf, /tmp (1777), /home/nonroot (65532)
#   USER 65532:65532, ENTRYPOINT ["/usr/local/bin/mailauth-operator"],
#   CMD ["controller"], EXPOSE 587 8080
# Every mtime is fixed and entries are sorted: the same binary gives the same
# image ID.
#
#   tests/image/build.sh            write target/image/mailauth-operator.tar
#   tests/image/build.sh --import   also import it into the local node's
#                                   containerd (tests/controlplane/node.sh)
#
# BIN (default target/release/mailauth-operator), IMAGE (default
# mailauth.local/mailauth-operator:<Cargo version>) and OUT (default
# target/image, the directory of the tarball and its staging root) override
# the defaults. The image's name is printed on stdout.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
bin="${BIN:-$repo/target/release/mailauth-operator}"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/Cargo.toml" | head -n1)"
image="${IMAGE:-mailauth.local/mailauth-operator:$version}"
out="${OUT:-$repo/target/image}"
tarball="$out/mailauth-operator.tar"

log() { echo "image: $*" >&2; }
die() { log "FAILED: $*"; exit 1; }

[[ -x "$bin" ]] || die "$bin is missing: make build"
ca_bundle=/etc/ssl/certs/ca-certificates.crt
[[ -s "$ca_bundle" ]] || die "$ca_bundle is missing (ca-certificates)"

rootfs="$out/rootfs"
rm -rf "$rootfs"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc/ssl/certs" "$rootfs/home/nonroot" "$rootfs/tmp"
install -m 0755 "$bin" "$rootfs/usr/local/bin/mailauth-operator"

# The loader and every library the binary links, each at the path the binary
# finds it by (real files, no symlinks to follow inside the image).
libs="$(ldd "$bin" | awk '/=> \// { print $3 } /^\t\/[^ ]+ \(0x/ { print $1 }')"
[[ -n "$libs" ]] || die "ldd found no libraries in $bin (a static binary needs none: then drop this check)"
interp="$(readelf -l "$bin" | sed -n 's/.*Requesting program interpreter: \(.*\)]$/\1/p')"
[[ -n "$interp" ]] || die "no program interpreter in $bin"
for lib in $libs $interp; do
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
  chmod 0755 "$rootfs$lib"
done

install -m 0644 "$ca_bundle" "$rootfs/etc/ssl/certs/ca-certificates.crt"
cat > "$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
cat > "$rootfs/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOF
cat > "$rootfs/etc/nsswitch.conf" <<'EOF'
passwd: files
group: files
hosts: files dns
EOF
chmod 0644 "$rootfs/etc/passwd" "$rootfs/etc/group" "$rootfs/etc/nsswitch.conf"
chmod 1777 "$rootfs/tmp"
chmod 0700 "$rootfs/home/nonroot"
# Directories get the mode they have in a distroless root.
find "$rootfs" -type d ! -path "$rootfs/tmp" ! -path "$rootfs/home/nonroot" -exec chmod 0755 {} +

# The binary must start in this root as it will in the pod: with only the
# files above (a missing library fails here, not in a CrashLoopBackOff).
if ((EUID == 0)); then
  chroot --userspec=65532:65532 "$rootfs" /usr/local/bin/mailauth-operator --version >/dev/null ||
    die "the binary does not start inside the image's root"
fi

SOURCE_DATE_EPOCH=0 "$here/docker-archive.py" --rootfs "$rootfs" --tag "$image" --out "$tarball" \
  --user 65532:65532 \
  --entrypoint '["/usr/local/bin/mailauth-operator"]' --cmd '["controller"]' \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
  --expose 587/tcp --expose 8080/tcp \
  --owner /home/nonroot=65532:65532 >/dev/null
log "$image in $tarball ($(du -h "$tarball" | cut -f1))"

if [[ "${1:-}" == --import ]]; then
  "$repo/tests/controlplane/node.sh" import "$tarball" >&2 || die "importing into the node's containerd"
  log "imported into the node's containerd"
fi
echo "$image"
