#!/usr/bin/env bash
# Install the content scanners the filter tests talk to (tests/helpers/daemons.py), from Debian
# packages: SpamAssassin's spamd, rspamd and ClamAV's clamd, and redis, where rspamd's Bayes
# classifier keeps its statistics (the only backend rspamd 3.4 has for them).
#
# Idempotent; needs root. The packages' own services are kept from starting (a policy-rc.d that
# refuses service starts is in place during the install) and are stopped and disabled afterwards:
# the tests run private instances on free loopback ports.
#
# Never runs sa-update or freshclam: both need the network, and the tests bring their own rules
# (SpamAssassin's shipped rules, a one-signature ClamAV database).

install_filters() (
    set -euo pipefail
    local packages=(spamassassin spamd spamc rspamd clamav clamav-daemon redis-server)
    local services=(spamd spamassassin rspamd clamav-daemon clamav-freshclam clamav-clamonacc redis-server)
    # Units that start daemons or fetch rules and signatures over the network (sa-update, freshclam).
    local units=(clamav-daemon.socket spamassassin-maintenance.timer clamav-freshclam-once.timer
                 clamav-freshclam-once.service)
    local policy=/usr/sbin/policy-rc.d

    if [ "$(id -u)" -ne 0 ]; then
        echo "install-filters: must run as root" >&2
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
        echo "install-filters: ${packages[*]} already installed"
    else
        if [ ! -e "$policy" ]; then
            printf '#!/bin/sh\n# Installed by install-filters.sh: no service starts.\nexit 101\n' >"$policy"
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

    # The tests start their own daemons; system instances would only hold ports and download rules.
    local s
    for s in "${services[@]}"; do
        if command -v systemctl >/dev/null 2>&1; then
            systemctl stop "$s.service" >/dev/null 2>&1 || true
            systemctl disable "$s.service" >/dev/null 2>&1 || true
        fi
        if [ -x "/etc/init.d/$s" ]; then
            "/etc/init.d/$s" stop >/dev/null 2>&1 || true
        fi
        if command -v update-rc.d >/dev/null 2>&1; then
            update-rc.d "$s" disable >/dev/null 2>&1 || true
        fi
    done
    if command -v systemctl >/dev/null 2>&1; then
        for s in "${units[@]}"; do
            systemctl stop "$s" >/dev/null 2>&1 || true
            systemctl disable "$s" >/dev/null 2>&1 || true
        done
    fi

    PATH="$PATH:/usr/sbin:/sbin"
    echo "install-filters: $(spamd --version | head -n 1)"
    echo "install-filters: $(rspamd --version | head -n 1)"
    echo "install-filters: $(clamd --version)"
    echo "install-filters: $(redis-server --version)"
)

install_filters "$@"
