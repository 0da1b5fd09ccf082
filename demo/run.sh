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

echo "== installing what the demo needs (Debian packages: Dovecot, Postfix, build tools;"
echo "   about a minute on a fresh machine, nothing when they are there)"
scripts/install-deps.sh
echo "== building imapull (the first time, cargo downloads the crates and compiles"
echo "   them: a few minutes on 2 cores; its progress follows)"
cargo build
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
# Sessions Postfix's smtpd has accepted so far, from its own log.
smtp_sessions() {
    sleep 1 # postlogd writes the log a moment later
    grep -c 'smtpd\[[0-9]*\]: connect from' "$POSTFIX_DIR/maillog" 2>/dev/null || true
}

echo "== imapull check (log in, greet the local server; no mail)"
"$imapull" --config "$work/imapull.toml" check
echo
echo "== imapull run"
start=$(smtp_sessions)
first=0
"$imapull" --config "$work/imapull.toml" run || first=$?
echo "exit code: $first"

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
flags=$(doveadm -c "$DOVECOT_CONF" -f tab fetch -u demo 'uid flags' mailbox INBOX)
echo "$flags" | head -9
total=$(echo "$flags" | tail -n +2 | wc -l)
seen=$(echo "$flags" | tail -n +2 | grep -c '\\Seen' || true)
echo "... $seen of $total messages are \\Seen (5 were read before the run)"
echo
echo "== imapull run, again: nothing new"
before=$(smtp_sessions)
first_sessions=$((before - start))
second=0
"$imapull" --config "$work/imapull.toml" run || second=$?
after=$(smtp_sessions)
echo "exit code: $second; SMTP sessions Postfix saw during this run: $((after - before))"
echo
echo "== imapull status (from the ledger)"
"$imapull" --config "$work/imapull.toml" status
echo "== imapull verify (the server against the ledger)"
"$imapull" --config "$work/imapull.toml" verify
echo "..."
echo
echo "== summary"
echo "first run:  exit $first, $n messages in Postfix's Maildir (25 were unread),"
echo "            over $first_sessions SMTP session(s)"
echo "            $seen of $total messages \\Seen on the server"
echo "second run: exit $second, $((after - before)) SMTP sessions opened"
echo
echo "== stopping the throwaway servers"
