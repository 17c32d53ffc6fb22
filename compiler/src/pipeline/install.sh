#!/bin/sh
# kiln's installer, written into every bundle by `kilnc bundle` and run by
# `kilnc flash` once a release's files are in <ROOT>/opt/kiln/releases/<RELEASE>:
# checks every file against SHA256SUMS, switches <ROOT>/opt/kiln/current to the release
# atomically (a new symlink renamed over the old one), runs `current/bin/kiln --version`, then
# loads the release's model and generates one token with it at the context the unit serves
# (`kiln run MODEL -p Hello -n 1 --ctx-size N`), and switches back to the previous release if
# either fails. Then it installs the systemd unit to
# <ROOT>/etc/systemd/system/kiln.service, keeps only the current and previous releases and,
# when ROOT is the running system, (re)starts the service.
#
# Usage: sh install.sh ROOT RELEASE
# $KILN_SMOKE_RUNNER, when set, runs the check (e.g. "qemu-aarch64-static -cpu cortex-a76" on a
# mounted SD card); "skip" skips it.
set -eu
usage="usage: sh install.sh ROOT RELEASE"
root=${1:?$usage}
release=${2:?$usage}
base="$root/opt/kiln"
dir="$base/releases/$release"
say() { echo "install.sh: $*" >&2; }

[ -d "$dir" ] || { say "$dir does not exist"; exit 1; }
if ! (cd "$dir" && sha256sum -c --quiet SHA256SUMS); then
    say "the files in $dir do not match their SHA256SUMS; nothing was changed"
    exit 1
fi
previous=$(readlink "$base/current" 2>/dev/null || true)

switch() {
    ln -sfn "$1" "$base/.current.tmp"
    mv -fT "$base/.current.tmp" "$base/current"
}
switch "releases/$release"
say "current -> releases/$release${previous:+ (was $previous)}"

runner=${KILN_SMOKE_RUNNER:-}
# The model the unit serves, and the context its memory was checked at.
model=""
for m in "$dir"/models/*.kiln; do [ -f "$m" ] && model="$base/current/models/${m##*/}"; done
ctx=$(sed -n 's/^ExecStart=.* --ctx-size \([0-9][0-9]*\).*/\1/p' "$dir/kiln.service")
smoke() {
    $runner "$base/current/bin/kiln" --version || { failed='`bin/kiln --version` did not run'; return 1; }
    [ -n "$model" ] || { failed="the release has no model"; return 1; }
    $runner "$base/current/bin/kiln" run "$model" -p Hello -n 1 ${ctx:+--ctx-size "$ctx"} >/dev/null ||
        { failed="\`bin/kiln run\` could not load ${model##*/} and generate a token"; return 1; }
}
failed=""
if [ "$runner" = skip ]; then
    say "smoke check skipped"
elif ! smoke; then
    if [ -n "$previous" ] && [ "$previous" != "releases/$release" ]; then
        switch "$previous"
        say "smoke check failed: $failed; rolled back to $previous"
    else
        rm -f "$base/current"
        say "smoke check failed: $failed; no previous release to roll back to"
    fi
    exit 2
fi

units="$root/etc/systemd/system"
mkdir -p "$units"
cp "$dir/kiln.service" "$units/.kiln.service.tmp"
mv -f "$units/.kiln.service.tmp" "$units/kiln.service"

for old in "$base"/releases/*; do
    [ -d "$old" ] || continue
    name="releases/${old##*/}"
    if [ "$name" != "releases/$release" ] && [ "$name" != "$previous" ]; then
        rm -rf "$old"
        say "removed the older release $name"
    fi
done

if [ "$root" = / ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload
    systemctl enable kiln.service
    systemctl restart kiln.service
    say "kiln.service restarted"
fi
say "installed $release"
