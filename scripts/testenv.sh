#!/usr/bin/env bash
# Private, throwaway mail servers for the tests and the demo.
#
#   scripts/testenv.sh start DIR   start Dovecot (IMAP, IMAPS, LMTP) and Postfix
#                                  (SMTP into Maildirs) from configs under DIR,
#                                  on free 127.0.0.1 ports; writes DIR/env
#   scripts/testenv.sh stop DIR    stop both, by the PIDs recorded under DIR
#   scripts/testenv.sh adduser DIR NAME   create the home of a listed user
#
# Nothing outside DIR is touched: no system service is started or stopped.
# DIR/env holds shell assignments: IMAP_PORT IMAPS_PORT LMTP_PORT SMTP_PORT
# CA_FILE DOVECOT_CONF POSTFIX_DIR VMAIL HOMES.
#
# Users: Dovecot knows demo and u0..u299 (password "secret", mail in
# DIR/home/NAME/Maildir). Postfix delivers NAME@example.test
# to DIR/vmail/NAME/Maildir for NAME in demo, carol, dave, erin, t0..t299. In Postfix, envelope senders starting with
# "reject5" get 554 and "defer4" get 450 (see sender_access), for the tests.
set -euo pipefail

cmd=${1:?usage: testenv.sh start|stop|adduser DIR}
dir=${2:?usage: testenv.sh start|stop|adduser DIR}

free_port() {
    local p
    while :; do
        p=$(( 20000 + RANDOM % 40000 ))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            # Not taken by anything we already picked in this run either.
            if [[ " ${picked:-} " != *" $p "* ]]; then
                picked="${picked:-} $p"
                echo "$p"
                return
            fi
        fi
    done
}

wait_port() {
    local port=$1 what=$2
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "testenv: $what did not start listening on 127.0.0.1:$port" >&2
    return 1
}

adduser() {
    local name=$1
    mkdir -p "$dir/home/$name"
    chown nobody:nogroup "$dir/home/$name"
    if ! grep -q "^$name:" "$dir/dovecot/users"; then
        echo "testenv: $name is not a listed user (demo, u0, u1, ...; see TESTENV_USERS)" >&2
        exit 1
    fi
}

# TESTENV_OAUTH2_URL: bearer tokens (XOAUTH2, OAUTHBEARER) are checked by
# POSTing them to this introspection endpoint (one the tests run on
# 127.0.0.1); unset, Dovecot offers neither mechanism.
oauth2_passdb() {
    [[ -n ${TESTENV_OAUTH2_URL:-} ]] || return 0
    cat > "$dir/dovecot/oauth2.conf.ext" <<OAUTH
introspection_mode = post
introspection_url = $TESTENV_OAUTH2_URL
username_attribute = username
active_attribute = active
active_value = true
force_introspection = yes
OAUTH
    printf 'passdb {\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = %s\n}\n' \
        "$dir/dovecot/oauth2.conf.ext"
}

start() {
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    chmod 755 "$dir"
    mkdir -p "$dir/certs" "$dir/dovecot/run" "$dir/dovecot/state" "$dir/home" \
        "$dir/postfix/queue" "$dir/postfix/data" "$dir/vmail"
    chown nobody:nogroup "$dir/vmail"
    chown postfix "$dir/postfix/data"

    # A throwaway CA and a certificate for localhost / 127.0.0.1.
    (
        cd "$dir/certs"
        openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=imapull test CA" \
            -keyout ca.key -out ca.pem 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
            -keyout server.key -out server.csr 2>/dev/null
        printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' > ext.cnf
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
            -days 2 -extfile ext.cnf -out server.pem 2>/dev/null
        chmod 644 server.key
    )

    local imap imaps lmtp smtp
    imap=$(free_port); imaps=$(free_port); lmtp=$(free_port); smtp=$(free_port)

    # Users are listed up front: Dovecot notices a changed passwd-file by
    # its mtime, which misses a second change within the same second.
    : > "$dir/dovecot/users"
    # TESTENV_USERS: how many (u0, u1, ...); the benchmark's stop mode
    # asks for a thousand.
    local users=${TESTENV_USERS:-300}
    for u in demo $(seq -f 'u%g' 0 $((users - 1))); do
        echo "$u:{PLAIN}secret:65534:65534::$dir/home/$u::" >> "$dir/dovecot/users"
    done
    cat > "$dir/dovecot/dovecot.conf" <<CONF
base_dir = $dir/dovecot/run
state_dir = $dir/dovecot/state
log_path = $dir/dovecot/log
instance_name = imapull-test-$$-$RANDOM
listen = 127.0.0.1
protocols = imap lmtp
ssl = yes
ssl_cert = <$dir/certs/server.pem
ssl_key = <$dir/certs/server.key
disable_plaintext_auth = no
# A refused login is answered at once: the tests refuse logins on purpose,
# and Dovecot's 2 s delay per failure made them wait (its growing penalty
# per address still applies).
auth_failure_delay = 0
auth_mechanisms = plain login$([[ -n ${TESTENV_OAUTH2_URL:-} ]] && echo " xoauth2 oauthbearer")
first_valid_uid = 1
mail_location = maildir:~/Maildir
mail_max_userip_connections = 200
# TESTENV_HIBERNATE=1: idle IDLE sessions go to one imap-hibernate
# process after 2 s, as on a server that must stay small (a compressed
# session cannot be hibernated). Off for the tests: mail saved at the
# moment of the handover was seen to go unreported until the next check.
imap_hibernate_timeout = $([[ ${TESTENV_HIBERNATE:-} == 1 ]] && echo 2s || echo 0)
default_process_limit = ${TESTENV_PROCESS_LIMIT:-100}
default_client_limit = ${TESTENV_CLIENT_LIMIT:-1000}
lmtp_save_to_detail_mailbox = no
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%Ln $dir/dovecot/users
}
$(oauth2_passdb)
userdb {
  driver = passwd-file
  args = username_format=%Ln $dir/dovecot/users
}
service imap-login {
  inet_listener imap {
    port = $imap
  }
  inet_listener imaps {
    port = $imaps
    ssl = yes
  }
}
service lmtp {
  inet_listener lmtp {
    address = 127.0.0.1
    port = $lmtp
  }
  unix_listener lmtp {
    mode = 0600
  }
}
protocol imap {
  mail_plugins = \$mail_plugins imap_zlib
}
service imap {
  unix_listener imap-master {
    user = \$default_internal_user
  }
}
namespace inbox {
  inbox = yes
  separator = /
  mailbox Trash {
    special_use = \\Trash
  }
}
CONF

    local pf=$dir/postfix
    cat > "$pf/main.cf" <<CONF
compatibility_level = 3.6
config_directory = $pf
queue_directory = $pf/queue
data_directory = $pf/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = mx.example.test
mydomain = example.test
myorigin = example.test
mydestination =
mynetworks = 127.0.0.0/8
relayhost =
alias_maps =
alias_database =
virtual_mailbox_domains = example.test
virtual_mailbox_base = $dir/vmail
virtual_mailbox_maps = texthash:$pf/vmaps
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
virtual_minimum_uid = 1
virtual_mailbox_limit = 0
message_size_limit = 52428800
smtpd_sender_restrictions = check_sender_access regexp:$pf/sender_access
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination
smtputf8_enable = yes
maillog_file = $pf/maillog
maillog_file_prefixes = $pf
biff = no
# Keep delivered bytes comparable: no Date:/Message-ID: added for us.
local_header_rewrite_clients =
# Postfix drops Return-Path from incoming mail by default; the tests compare
# every byte imapull sent, so only the defaults that never occur here stay.
message_drop_headers = bcc, content-length, resent-bcc
# Nothing leaves this machine: mail for other domains fails at once.
default_transport = error:this test Postfix delivers only to example.test
CONF
    # virtual(8) refuses regexp substitutions, so the users are listed:
    # a few names for people and t0..t299 for the tests.
    for u in demo carol dave erin $(seq -f 't%g' 0 299); do
        echo "$u@example.test $u/Maildir/"
    done > "$pf/vmaps"
    printf '%s\n' '/^reject5/ 554 5.7.1 refused by the test sender_access' \
        '/^defer4/ 450 4.7.1 deferred by the test sender_access' > "$pf/sender_access"
    cat > "$pf/master.cf" <<CONF
127.0.0.1:$smtp inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n -  0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n -  - trivial-rewrite
bounce    unix  - - n -  0 bounce
defer     unix  - - n -  0 bounce
trace     unix  - - n -  0 bounce
verify    unix  - - n -  1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -  - proxymap
smtp      unix  - - n -  - smtp
relay     unix  - - n -  - smtp
showq     unix  n - n -  - showq
error     unix  - - n -  - error
retry     unix  - - n -  - error
discard   unix  - - n -  - discard
local     unix  - n n -  - local
virtual   unix  - n n -  - virtual
lmtp      unix  - - n -  - lmtp
anvil     unix  - - n -  1 anvil
scache    unix  - - n -  1 scache
postlog   unix-dgram n - n - 1 postlogd
CONF

    cat > "$dir/env" <<ENV
IMAP_PORT=$imap
IMAPS_PORT=$imaps
LMTP_PORT=$lmtp
SMTP_PORT=$smtp
CA_FILE=$dir/certs/ca.pem
DOVECOT_CONF=$dir/dovecot/dovecot.conf
POSTFIX_DIR=$pf
VMAIL=$dir/vmail
HOMES=$dir/home
ENV

    # The daemons must not hold the caller's stdout/stderr open: a caller
    # that reads them to EOF would wait for as long as the servers run.
    if ! dovecot -c "$dir/dovecot/dovecot.conf" </dev/null >"$dir/dovecot/start.log" 2>&1; then
        echo "testenv: Dovecot did not start:" >&2
        cat "$dir/dovecot/start.log" >&2
        exit 1
    fi
    if ! postfix -c "$pf" start </dev/null >/dev/null 2>&1; then
        echo "testenv: Postfix did not start; its log:" >&2
        tail -n 20 "$pf/maillog" >&2 2>/dev/null || true
        exit 1
    fi
    wait_port "$imaps" "Dovecot IMAPS"
    wait_port "$imap" "Dovecot IMAP"
    wait_port "$lmtp" "Dovecot LMTP"
    wait_port "$smtp" "Postfix SMTP"
}

stop() {
    [[ -f "$dir/env" ]] || return 0
    # shellcheck disable=SC1091
    source "$dir/env"
    if [[ -f "$POSTFIX_DIR/queue/pid/master.pid" ]]; then
        postfix -c "$POSTFIX_DIR" stop >/dev/null 2>&1 || true
    fi
    local pidfile=$dir/dovecot/run/master.pid
    if [[ -f "$pidfile" ]]; then
        local pid
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
    fi
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    adduser)
        dir=$(cd "$dir" && pwd)
        adduser "${3:?usage: testenv.sh adduser DIR NAME}"
        ;;
    *) echo "usage: testenv.sh start|stop|adduser DIR" >&2; exit 64 ;;
esac
