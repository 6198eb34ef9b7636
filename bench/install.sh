#!/usr/bin/env bash
# Install the servers the benchmark suite compares pop3proxy with, from Debian packages:
# Dovecot (the upstream and the direct baseline), perdition (a POP3 proxy) and nginx's mail proxy;
# HAProxy in front of two cluster nodes (workload 9, which also needs .ci/install-postgres.sh).
# Also the Python profilers used by `python -m bench --profile` (py-spy, pyinstrument).
#
# Idempotent; needs root. The packages' own services are kept from starting (a policy-rc.d that
# refuses service starts is in place during the install) and are stopped afterwards: the suite runs
# private instances on loopback ports. A package that the distribution does not have is reported
# and skipped; the suite then prints "not available" for its rows.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "bench/install.sh: must run as root" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# Installed by bench/install.sh: no service starts.\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi

apt-get update -qq
wanted=(dovecot-core dovecot-pop3d perdition nginx-core libnginx-mod-mail haproxy)
available=()
for p in "${wanted[@]}"; do
    if apt-cache show "$p" >/dev/null 2>&1; then
        available+=("$p")
    else
        echo "bench/install.sh: package $p is not available here; its benchmark rows will be skipped" >&2
    fi
done
apt-get install -y -qq --no-install-recommends "${available[@]}" procps

for s in dovecot perdition nginx haproxy; do
    if command -v systemctl >/dev/null 2>&1; then
        systemctl stop "$s.service" >/dev/null 2>&1 || true
        systemctl disable "$s.service" >/dev/null 2>&1 || true
    fi
    if [ -x "/etc/init.d/$s" ]; then
        "/etc/init.d/$s" stop >/dev/null 2>&1 || true
    fi
done

python3 -m pip install -q py-spy pyinstrument trustme

PATH="$PATH:/usr/sbin:/sbin"
echo "bench/install.sh: dovecot $(dovecot --version 2>/dev/null || echo missing)"
echo "bench/install.sh: $(perdition --version 2>&1 | head -n 1 || echo 'perdition missing')"
echo "bench/install.sh: $(nginx -v 2>&1 || echo 'nginx missing')"
echo "bench/install.sh: $(haproxy -v 2>/dev/null | head -n 1 || echo 'haproxy missing')"
