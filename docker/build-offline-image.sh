#!/usr/bin/env bash
# Builds a PostgreSQL image that honours the official `postgres` image's contract
# from the PostgreSQL server binaries installed on this machine, and loads it with
# `docker import`. No registry is needed.
#
#   docker/build-offline-image.sh [IMAGE]        # default: pgfixture/postgres-offline:<major>
#
# Needs: docker (a running daemon), PostgreSQL server binaries under
# /usr/lib/postgresql/<major> (Debian package `postgresql`), and busybox (Debian package
# `busybox-static`) for the image's shell. Use the result with PGFIXTURE_IMAGE=IMAGE.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
pgroot=${PG_ROOT:-}
if [ -z "$pgroot" ]; then
    pgroot=$(ls -d /usr/lib/postgresql/*/ 2>/dev/null | sort -V | tail -n 1)
    pgroot=${pgroot%/}
fi
if [ -z "$pgroot" ] || [ ! -x "$pgroot/bin/postgres" ]; then
    echo "build-offline-image.sh: no PostgreSQL server under /usr/lib/postgresql/<major>; install the Debian package 'postgresql' or set PG_ROOT" >&2
    exit 1
fi
major=$(basename "$pgroot")
share=/usr/share/postgresql/$major
image=${1:-pgfixture/postgres-offline:$major}
busybox=$(command -v busybox || true)
if [ -z "$busybox" ] || ! file -L "$busybox" 2>/dev/null | grep -q 'statically linked'; then
    [ -x /bin/busybox ] && busybox=/bin/busybox
fi
if [ -z "$busybox" ]; then
    echo "build-offline-image.sh: busybox not found; install the Debian package 'busybox-static'" >&2
    exit 1
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

mkdir -p "$root"/{bin,etc,tmp,usr/lib,usr/lib64,usr/local/bin,usr/share,var/run/postgresql,var/lib/postgresql/data,docker-entrypoint-initdb.d}
# Merged /usr, as on Debian: /lib and /lib64 lead into /usr.
ln -s usr/lib "$root/lib"
ln -s usr/lib64 "$root/lib64"
chmod 1777 "$root/tmp"

# The shell and the small tools the entry point and pgfixture's watchdog use.
cp "$busybox" "$root/bin/busybox"
for tool in sh ash cat chmod cp echo grep gunzip id kill ls mkdir mktemp printf rm sleep test wc; do
    ln -s busybox "$root/bin/$tool"
done

# PostgreSQL itself (without the LLVM JIT, which pulls in hundreds of MB and which
# throwaway test servers do not need), its shared files, and every shared library its
# programs load.
mkdir -p "$root$pgroot" "$root/usr/share/postgresql"
cp -a "$pgroot/." "$root$pgroot/"
rm -rf "$root$pgroot/lib/llvmjit"* "$root$pgroot/lib/bitcode"
cp -a "$share" "$root/usr/share/postgresql/"
[ -d /usr/share/zoneinfo ] && cp -a /usr/share/zoneinfo "$root/usr/share/"
{
    find "$root$pgroot" -type f \( -perm -u+x -o -name '*.so*' \) -print0 |
        { xargs -0 ldd 2>/dev/null || true; } | awk '/=> \//{print $3} /^\s*\/lib/{print $1}'
} | sort -u | while read -r lib; do
    [ -e "$lib" ] || continue
    cp -L --parents "$lib" "$root/"
    real=$(readlink -f "$lib")
    [ "$real" = "$lib" ] || cp -L --parents "$real" "$root/" 2>/dev/null || true
done
for loader in /lib64/ld-linux-x86-64.so.2 /lib/ld-linux-aarch64.so.1; do
    if [ -e "$loader" ]; then cp -L --parents "$loader" "$root/"; fi
done

install -m 0755 "$here/docker-entrypoint.sh" "$root/usr/local/bin/docker-entrypoint.sh"
cat > "$root/etc/passwd" <<PASSWD
root:x:0:0:root:/root:/bin/sh
postgres:x:999:999:PostgreSQL:/var/lib/postgresql:/bin/sh
PASSWD
cat > "$root/etc/group" <<GROUP
root:x:0:
postgres:x:999:
GROUP
chown -R 999:999 "$root/var/run/postgresql" "$root/var/lib/postgresql"
chmod 0700 "$root/var/lib/postgresql/data"

tar -C "$root" --numeric-owner -cf - . | docker import \
    --change "ENV PATH=$pgroot/bin:/usr/local/bin:/bin" \
    --change "ENV PGDATA=/var/lib/postgresql/data" \
    --change "ENV LANG=C.UTF-8" \
    --change "USER postgres" \
    --change "WORKDIR /var/lib/postgresql" \
    --change "EXPOSE 5432" \
    --change 'ENTRYPOINT ["docker-entrypoint.sh"]' \
    --change 'CMD ["postgres"]' \
    - "$image" >/dev/null
echo "$image"
