#!/usr/bin/env bash
# Install the PostgreSQL server used by the tests (tests/helpers/postgres.py) on Debian/Ubuntu.
#
# Idempotent; needs root. The tests start their own server (initdb in a temporary directory, a free
# loopback port); the package's own cluster is kept from starting on port 5432 (a policy-rc.d that
# refuses service starts is in place during the install) and is stopped, disabled and set to manual
# start afterwards.
#
# Run it (bash .ci/install-postgres.sh) or source it; either way it runs once, in a subshell, so
# its shell options and traps do not leak into the caller.

install_postgres() (
    set -euo pipefail
    local packages=(postgresql)
    local policy=/usr/sbin/policy-rc.d

    if [ "$(id -u)" -ne 0 ]; then
        echo "install-postgres: must run as root" >&2
        return 1
    fi

    installed() {
        local p
        for p in "${packages[@]}"; do
            dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' ||
                return 1
        done
        compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
    }

    if installed; then
        echo "install-postgres: ${packages[*]} already installed"
    else
        if [ ! -e "$policy" ]; then
            printf '#!/bin/sh\n# Installed by install-postgres.sh: no service starts.\nexit 101\n' >"$policy"
            chmod 0755 "$policy"
            trap 'rm -f "$policy"' EXIT
        fi

        local p need_update=no
        for p in "${packages[@]}"; do
            apt-cache show "$p" >/dev/null 2>&1 || need_update=yes
        done
        if [ "$need_update" = yes ]; then
            apt-get update
        fi
        export DEBIAN_FRONTEND=noninteractive
        if ! apt-get install -y --no-install-recommends "${packages[@]}"; then
            # Stale package lists (files gone from the mirror): refresh once and retry.
            apt-get update
            apt-get install -y --no-install-recommends "${packages[@]}"
        fi
    fi

    # The tests start PostgreSQL themselves; the system cluster would only hold port 5432.
    if command -v systemctl >/dev/null 2>&1; then
        systemctl stop postgresql.service 'postgresql@*.service' >/dev/null 2>&1 || true
        systemctl disable postgresql.service >/dev/null 2>&1 || true
    fi
    if [ -x /etc/init.d/postgresql ]; then
        /etc/init.d/postgresql stop >/dev/null 2>&1 || true
    fi
    if command -v update-rc.d >/dev/null 2>&1; then
        update-rc.d postgresql disable >/dev/null 2>&1 || true
    fi
    local conf
    for conf in /etc/postgresql/*/*/start.conf; do
        [ -e "$conf" ] && echo manual >"$conf"
    done

    local bindir
    bindir="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
    echo "install-postgres: $("$bindir/postgres" --version) in $bindir"
)

install_postgres "$@"
