#!/usr/bin/env bash
# Installs the tools tests/test_rules.py needs, `promtool` (and `prometheus`), from Debian's
# `prometheus` package. Idempotent: does nothing when both are already on PATH.
#
#   sudo tests/install-debian-tools.sh
#
# The package's maintainer scripts would start a Prometheus server; a temporary
# /usr/sbin/policy-rc.d that refuses every service start (exit 101) prevents that, and any
# policy-rc.d already there is put back afterwards.
set -euo pipefail

package=prometheus
policy=/usr/sbin/policy-rc.d

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    echo "prometheus and promtool are already installed ($(command -v promtool))"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "error: promtool and prometheus are not both on PATH, and installing the Debian" \
        "package '$package' needs root: run 'sudo $0'" \
        "(or 'sudo apt-get install --no-install-recommends $package')" >&2
    exit 1
fi

# Put the service policy back whatever happens (errors, Ctrl-C, kill).
backup=""
wrote_policy=0
restore_policy() {
    if ((wrote_policy)); then
        rm -f "$policy"
    fi
    if [[ -n $backup ]]; then
        mv -f "$backup" "$policy"
    fi
}
trap restore_policy EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -e $policy || -L $policy ]]; then
    saved=$(mktemp "$policy.cpworker.XXXXXX")
    cp -a "$policy" "$saved"
    backup=$saved
fi
wrote_policy=1
printf '#!/bin/sh\n# written by cpworker tests/install-debian-tools.sh: start no service\nexit 101\n' \
    >"$policy"
chmod 0755 "$policy"

# Prometheus servers running before the install are none of our business.
running_before=$(pgrep -x prometheus || true)

apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$package"

# Stop a server the install started anyway (the policy above should have prevented it).
started=()
for pid in $(pgrep -x prometheus || true); do
    if ! grep -qxF "$pid" <<<"$running_before"; then
        started+=("$pid")
    fi
done
if ((${#started[@]})); then
    echo "stopping the prometheus server the install started (pid ${started[*]})"
    kill "${started[@]}" 2>/dev/null || true
    for _ in $(seq 50); do
        alive=0
        for pid in "${started[@]}"; do
            if kill -0 "$pid" 2>/dev/null; then
                alive=1
            fi
        done
        ((alive)) || break
        sleep 0.1
    done
fi

promtool --version
