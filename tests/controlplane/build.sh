#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kubectl and helm from the Go module proxy at the
# versions pinned in versions.env, into a cache outside the repository:
#   ${MAILAUTH_CACHE:-$HOME/.cache/mailauth-operator}/controlplane/<versions>/bin
# A finished build is reused; the first one takes many minutes.
# Prints the bin directory on stdout.
#
#   build.sh node  builds kubelet, kube-controller-manager and kube-scheduler
#                  (for node.sh) from the same wrapper module, into their own
#                  cache directory .../controlplane/node-kube-<version>/bin, so
#                  the control plane's cache above stays as it is.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache_root="${MAILAUTH_CACHE:-$HOME/.cache/mailauth-operator}"
what="${1:-controlplane}"
case "$what" in
  controlplane) bin="$cache_root/controlplane/kube-$KUBE_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION/bin" ;;
  node) bin="$cache_root/controlplane/node-kube-$KUBE_VERSION/bin" ;;
  *) echo "usage: $0 [node]" >&2; exit 2 ;;
esac
if [[ -x "$bin/.complete" ]]; then
  echo "$bin"
  exit 0
fi
mkdir -p "$bin"
export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=local

build() { # build <module dir> <output name> <package> [ldflags]
  local dir="$1" out="$2" pkg="$3" ldflags="${4:-}"
  if [[ -x "$bin/$out" ]]; then return; fi
  echo "building $out ($pkg)" >&2
  (cd "$here/$dir" && go build -trimpath -ldflags "-s -w $ldflags" -o "$bin/$out.tmp" "$pkg")
  mv "$bin/$out.tmp" "$bin/$out"
}

kube_ldflags="-X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION"

if [[ "$what" == node ]]; then
  build kube kubelet ./cmd/kubelet "$kube_ldflags"
  build kube kube-controller-manager ./cmd/kube-controller-manager "$kube_ldflags"
  build kube kube-scheduler ./cmd/kube-scheduler "$kube_ldflags"
  printf '#!/bin/sh\n' > "$bin/.complete" && chmod +x "$bin/.complete"
  echo "$bin"
  exit 0
fi

build etcd etcd .
build kube kube-apiserver ./cmd/kube-apiserver "$kube_ldflags"
build kube kubectl ./cmd/kubectl "$kube_ldflags"
build helm helm helm.sh/helm/v3/cmd/helm "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"

printf '#!/bin/sh\n' > "$bin/.complete" && chmod +x "$bin/.complete"
echo "$bin"
