#!/usr/bin/env bash
# Installs what building imapull and running its tests and demo need on
# Debian 12 (as root): the build libraries, Dovecot (IMAP + LMTP),
# Postfix, and PullIMAP (for the import test). Postfix is installed with "No configuration" and none of the
# system services is started: the tests and the demo run private instances.
set -euo pipefail

need=()
# A minimal Debian has no CA certificates: cargo could not fetch crates.
dpkg -s ca-certificates >/dev/null 2>&1 || need+=(ca-certificates)
command -v pkg-config >/dev/null || need+=(pkg-config)
dpkg -s libssl-dev >/dev/null 2>&1 || need+=(libssl-dev)
command -v dovecot >/dev/null || need+=(dovecot-imapd dovecot-lmtpd)
dpkg -s dovecot-lmtpd >/dev/null 2>&1 || need+=(dovecot-lmtpd)
command -v postfix >/dev/null || need+=(postfix)
command -v openssl >/dev/null || need+=(openssl)
# A private sshd on a loopback port carries the tunnel test over real SSH.
command -v sshd >/dev/null || need+=(openssh-server)
command -v ssh >/dev/null || need+=(openssh-client)
command -v cc >/dev/null || need+=(gcc libc6-dev)
# The import test runs the Debian PullIMAP to write a real statefile.
command -v pullimap >/dev/null || need+=(pullimap)

if ((${#need[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "install-deps: need root to install: ${need[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    echo "install-deps: installing ${need[*]}"
    apt-get update -qq
    # policy-rc.d keeps the packages from starting their system services.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# systemd-analyze checks the unit files in the tests; it is optional (the
# check is skipped without it), so a failed install is not fatal.
if ! command -v systemd-analyze >/dev/null && [[ $(id -u) -eq 0 ]]; then
    apt-get install -y -qq --no-install-recommends systemd >/dev/null 2>&1 ||
        echo "install-deps: systemd not installed; unit files will not be verified" >&2
fi

if ! command -v cargo >/dev/null; then
    echo "install-deps: cargo is missing; install a Rust toolchain (rustup.rs or apt-get install cargo)" >&2
    exit 1
fi
