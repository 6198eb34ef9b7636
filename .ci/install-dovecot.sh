#!/usr/bin/env bash
# Install the Dovecot POP3 server used by the tests (tests/dovecot.py) on Debian/Ubuntu.
#
# Idempotent; needs root. The package's own service is kept from starting (a policy-rc.d that
# refuses service starts is in place during the install) and is stopped and disabled afterwards:
# the tests run their own Dovecot instances with a private configuration.
#
# Run it (bash .ci/install-dovecot.sh) or source it; either way it runs once, in a subshell, so
# its shell options and traps do not leak into the caller.

install_dovecot() (
    set -euo pipefail
    local packages=(dovecot-core dovecot-pop3d)
    local policy=/usr/sbin/policy-rc.d

    if [ "$(id -u)" -ne 0 ]; then
        echo "install-dovecot: must run as root" >&2
        return 1
    fi

    installed() {
        local p
        for p in "${packages[@]}"; do
            dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' ||
                return 1
        done
    }

    if installed; then
        echo "install-dovecot: ${packages[*]} already installed"
    else
        if [ ! -e "$policy" ]; then
            printf '#!/bin/sh\n# Installed by install-dovecot.sh: no service starts.\nexit 101\n' >"$policy"
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

    # The tests start Dovecot themselves; a system instance would only hold ports 110/995.
    if command -v systemctl >/dev/null 2>&1; then
        systemctl stop dovecot.service dovecot.socket >/dev/null 2>&1 || true
        systemctl disable dovecot.service dovecot.socket >/dev/null 2>&1 || true
    fi
    if [ -x /etc/init.d/dovecot ]; then
        /etc/init.d/dovecot stop >/dev/null 2>&1 || true
    fi
    if command -v update-rc.d >/dev/null 2>&1; then
        update-rc.d dovecot disable >/dev/null 2>&1 || true
    fi

    command -v dovecot >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin"
    echo "install-dovecot: $(dovecot --version)"
)

install_dovecot "$@"
