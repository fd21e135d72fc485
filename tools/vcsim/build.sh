#!/usr/bin/env bash
# Build the vSphere simulator (tools/vcsim/main.go) into OUT (default build/vcsim/vcsim).
#
# Offline and from Debian's packages only: golang-go and golang-github-vmware-govmomi-dev
# (tools/install-deps.sh installs both). GOPATH mode, because the packaged sources live in
# /usr/share/gocode/src without a module proxy. About 4 minutes on 2 cores the first time; the
# Go build cache is kept beside the binary, so a rebuild after a change to main.go is quick.
# The Makefile runs this only when the binary is missing or main.go changed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../build/vcsim/vcsim}
mkdir -p "$(dirname "$out")"
out=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src/vcsim"
cp "$here/main.go" "$work/src/vcsim/main.go"
start=$(date +%s)
cd "$work/src/vcsim"
GO111MODULE=off GOPATH="$work:/usr/share/gocode" GOCACHE="${GOCACHE:-$(dirname "$out")/gocache}" GOFLAGS= \
    go build -o "$out.tmp" .
mv "$out.tmp" "$out"
echo "event=vcsim_built seconds=$(( $(date +%s) - start )) path=$out"
