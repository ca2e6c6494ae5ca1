#!/bin/sh
# Lays out the runtime image's whole filesystem under OUT from one built
# binary: the binary, the shared libraries it loads (glibc is dynamic),
# passwd/group entries for uid/gid 65532, the config and state directories.
# No shell, no package manager, nothing else.
#
#   deploy/container/rootfs.sh target/dist/portcullis OUT
#
# The Containerfile's build stage runs it; the image test runs it on a
# host-built binary, so both images hold the same layout.
set -eu

bin=$1
out=$2
uid=65532

rm -rf "$out"
mkdir -p "$out/usr/local/bin" "$out/etc/portcullis" "$out/var/lib/portcullis" "$out/tmp"
cp "$bin" "$out/usr/local/bin/portcullis"
chmod 0755 "$out/usr/local/bin/portcullis"

# Every library the dynamic loader resolves, and the loader itself, at the
# paths the binary asks for.
ldd "$bin" | awk '
  $2 == "=>" && $3 ~ /^\// { print $3 }
  $1 ~ /^\// { print $1 }
' | while read -r lib; do
  mkdir -p "$out$(dirname "$lib")"
  cp -L "$lib" "$out$lib"
done
# /lib64 and /lib are links on merged-/usr systems; the loader path the
# binary names must resolve either way.
if [ -e /lib64/ld-linux-x86-64.so.2 ] && [ ! -e "$out/lib64/ld-linux-x86-64.so.2" ]; then
  mkdir -p "$out/lib64"
  cp -L /lib64/ld-linux-x86-64.so.2 "$out/lib64/"
fi

printf 'root:x:0:0:root:/:/sbin/nologin\nportcullis:x:%s:%s:portcullis:/var/lib/portcullis:/sbin/nologin\n' "$uid" "$uid" >"$out/etc/passwd"
printf 'root:x:0:\nportcullis:x:%s:\n' "$uid" >"$out/etc/group"

chown -R 0:0 "$out"
chown "$uid:$uid" "$out/var/lib/portcullis"
chmod 0700 "$out/var/lib/portcullis"
chmod 1777 "$out/tmp"
