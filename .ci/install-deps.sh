#!/usr/bin/env bash
# Install the system tools the test suite talks to: real clients (curl, fetchmail) and a real
# provider (Dovecot). Idempotent; needs root (or sudo).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

missing=()
command -v curl >/dev/null || missing+=(curl ca-certificates)
command -v fetchmail >/dev/null || missing+=(fetchmail)
command -v mutt >/dev/null || missing+=(mutt)
command -v swaks >/dev/null || missing+=(swaks libnet-ssleay-perl libio-socket-ssl-perl)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v haproxy >/dev/null || missing+=(haproxy)  # the load balancer in front of pop3proxy (PROXY protocol tests)
# The OAuth2 authorization server of the tests (oidc-provider) runs on node.
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
# the packaging test installs the wheel in a fresh venv
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
command -v chromium >/dev/null || missing+=(chromium)  # the web console's browser test (driven by Playwright)
if [ "${#missing[@]}" -gt 0 ]; then
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
$SUDO bash "$here/install-dovecot.sh"
$SUDO bash "$here/install-postgres.sh"  # the cluster engines' tests start their own server
$SUDO bash "$here/install-filters.sh"
# oidc-provider, pinned by tests/helpers/oidc/package-lock.json.
(cd "$here/../tests/helpers/oidc" && npm ci --no-audit --no-fund --loglevel=error)
