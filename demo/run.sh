#!/usr/bin/env bash
# The demo: imapull's main job on a fresh Debian 12 machine, as root.
#
# Installs what it needs, builds imapull, starts a throwaway Dovecot (IMAPS
# with a throwaway CA) and a throwaway Postfix on free 127.0.0.1 ports,
# fills a mailbox with sample messages, pulls it, shows what arrived in
# Postfix's Maildir and the flags on the IMAP server, pulls again (nothing
# new), and stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

scripts/install-deps.sh
echo "== building imapull"
cargo build --quiet
imapull=$root/target/debug/imapull

work=$(mktemp -d /tmp/imapull-demo.XXXXXX)
cleanup() {
    "$root/scripts/testenv.sh" stop "$work" || true
    rm -rf "$work"
}
trap cleanup EXIT

echo "== starting a throwaway Dovecot and Postfix in $work"
scripts/testenv.sh start "$work"
# shellcheck disable=SC1091
source "$work/env"
scripts/testenv.sh adduser "$work" demo

echo "== putting 30 messages into demo's INBOX (5 of them already read)"
md=$HOMES/demo/Maildir
mkdir -p "$md/new" "$md/cur" "$md/tmp"
for i in $(seq 1 30); do
    f=$md/tmp/$i
    printf 'From: Sender %d <sender%d@provider.example>\r\nTo: demo@provider.example\r\nSubject: sample message %d\r\nDate: Mon, 23 Nov 2026 10:%02d:00 +0000\r\nMessage-ID: <sample%d@provider.example>\r\n\r\nHello, this is message %d.\r\n' \
        "$i" "$i" "$i" "$i" "$i" "$i" > "$f"
    if ((i <= 5)); then mv "$f" "$md/cur/$i.demo:2,S"; else mv "$f" "$md/new/$i.demo"; fi
done
chown -R nobody:nogroup "$HOMES/demo"

cat > "$work/imapull.toml" <<CONF
ledger = "$work/ledger.sqlite3"

[accounts.demo]
host = "localhost"
port = $IMAPS_PORT
ca_file = "$CA_FILE"
username = "demo"
password_file = "$work/password"
deliver = "smtp://127.0.0.1:$SMTP_PORT"
recipients = ["demo@example.test"]
CONF
printf 'secret\n' > "$work/password"
chmod 600 "$work/password"

echo
echo "== the config ($work/imapull.toml)"
cat "$work/imapull.toml"
echo
echo "== imapull run"
"$imapull" --config "$work/imapull.toml" run
echo "exit code: $?"

# Postfix queues and then writes the Maildir: give it a moment.
for _ in $(seq 1 50); do
    n=$(find "$VMAIL/demo/Maildir/new" -type f 2>/dev/null | wc -l)
    ((n >= 25)) && break
    sleep 0.2
done
echo
echo "== delivered into Postfix's Maildir ($VMAIL/demo/Maildir/new): $n messages"
for f in $(ls "$VMAIL/demo/Maildir/new" | head -3); do
    echo "--- $f"
    sed -n '1,/^$/p' "$VMAIL/demo/Maildir/new/$f"
done
echo "... and $((n - 3)) more"
echo
echo "== flags on the IMAP server"
doveadm -c "$DOVECOT_CONF" -f tab fetch -u demo 'uid flags' mailbox INBOX | head -9
echo "... (every message is \\Seen now: 5 were read before, 25 were pulled)"
echo
echo "== imapull run, again: nothing new, no SMTP connection"
"$imapull" --config "$work/imapull.toml" run
echo
echo "== imapull status (the ledger)"
"$imapull" --config "$work/imapull.toml" status | head -8
echo "..."
echo
echo "== stopping the throwaway servers"
