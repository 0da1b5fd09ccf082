#!/usr/bin/env bash
# The throughput benchmark: imapull, pullimap and fetchmail pull the same
# mailbox over IMAPS from a throwaway Dovecot into the same receiver
# (Postfix's smtp-sink), on 127.0.0.1; plus PullIMAP with TCP_NODELAY forced
# by an LD_PRELOAD shim (pullimap-nd, bench/nodelay.c), and the limit, a
# bare client that issues one UID FETCH 1:* and discards the bytes, and the
# end-to-end limit (e2e), a bare client that streams that FETCH into one
# pipelined SMTP session with no ledger. imapull-2s is imapull with two
# delivery sessions, imapull-2si with two independent ones
# (independent_sessions), imapull-grouped and imapull-msg imapull with each
# durability, imapull-base another build of imapull named by IMAPULL_BASE
# (before/after a change; BENCH_TOOLS picks tools). As root on Debian:
#
#   bench/run.sh [N] [RUNS] [MIX]     default: 1000 messages, 3 runs, realistic
#   bench/run.sh memory               peak RSS: a 50 MB message among small
#                                     ones; 1,000 vs 50,000 small messages
#   bench/run.sh accounts             20 accounts at once, and nothing new
#                                     (with IMAPULL_BASE: A/B of nothing new)
#   bench/run.sh compress [N] [MIX]   bytes on the wire with and without DEFLATE
#   bench/run.sh stop [N]             a daemon on N (1000) idling accounts:
#                                     its RSS, idle CPU, arrival-to-delivery
#                                     time, Dovecot's processes, SIGTERM time
#   bench/run.sh receivers [N] [RUNS] imapull into Postfix and Dovecot LMTP,
#                                     one, two, and two independent
#                                     delivery sessions
#   bench/run.sh link [RTT MBIT N]    a slow link (default 40 ms, 50 Mbit/s,
#                                     1000 messages): first pull with and
#                                     without COMPRESS, nothing new and its
#                                     round trips, 20 accounts (against
#                                     Dovecot's default and its shared
#                                     login processes), bytes;
#                                     SHAPE_TIMELINE=DIR also writes each
#                                     connection's flights and the link's
#                                     idle times to DIR
#
# It prints a table with medians of RUNS runs and the ratios of each tool
# to imapull and to the limit. docs/performance.md has the latest figures.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

scripts/install-deps.sh
need=()
command -v pullimap >/dev/null || need+=(pullimap)
command -v fetchmail >/dev/null || need+=(fetchmail)
[[ -x /usr/bin/time ]] || need+=(time)
if ((${#need[@]})); then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
cargo build --release --quiet --bin imapull --example bench-tools
imapull=$root/target/release/imapull
nodelay=$(mktemp /tmp/imapull-nodelay.XXXXXX.so)
cc -shared -fPIC -O2 -o "$nodelay" bench/nodelay.c -ldl
tools=$root/target/release/examples/bench-tools

work=$(mktemp -d /tmp/imapull-bench.XXXXXX)
sink_pid=
shape_pid=
inotify_was=
cleanup() {
    [[ -n $sink_pid ]] && kill "$sink_pid" 2>/dev/null || true
    [[ -n $shape_pid ]] && kill "$shape_pid" 2>/dev/null || true
    [[ -n $inotify_was ]] && echo "$inotify_was" > /proc/sys/fs/inotify/max_user_instances
    "$root/scripts/testenv.sh" stop "$work" || true
    rm -rf "$work" "$nodelay"
}
trap cleanup EXIT

if [[ ${1:-} == stop ]]; then
    # One Dovecot user per account, and room for a thousand sessions.
    export TESTENV_USERS=${2:-1000} TESTENV_PROCESS_LIMIT=2000 TESTENV_CLIENT_LIMIT=4000
    export TESTENV_HIBERNATE=1
fi
scripts/testenv.sh start "$work" >/dev/null
# shellcheck disable=SC1091
source "$work/env"
scripts/testenv.sh adduser "$work" demo
user=demo
maildir=$HOMES/$user/Maildir

# The receiver: smtp-sink, counting the messages it accepted (-c prints a
# running count), so that the benchmark can check that every message
# arrived. It does not write them to disk (-d): that would make the
# receiver, not the tools, the thing measured (it triples smtp-sink's CPU
# time), and the tests check the bytes against a real Postfix.
sink_port=$(( 20000 + RANDOM % 40000 ))
smtp-sink -u nobody -c "127.0.0.1:$sink_port" 512 >"$work/sink.out" &
sink_pid=$!
sleep 0.5

# Restores the seeded mailbox: every message unread, fresh Dovecot indexes
# (built before the timed run, so no tool pays for them).
restore() {
    rm -rf "$maildir"
    cp -a "$work/template" "$maildir"
    chown -R nobody:nogroup "$HOMES/$user"
    doveadm -c "$DOVECOT_CONF" force-resync -u "$user" INBOX
    doveadm -c "$DOVECOT_CONF" mailbox status -u "$user" messages INBOX >/dev/null
    sink_base=$(sink_count)
}

# Messages smtp-sink has accepted since it started.
sink_count() {
    tr '\r' '\n' < "$work/sink.out" | sed -n 's/.*mesg=\([0-9]*\).*/\1/p' | tail -1 | grep . || echo 0
}

# Runs one tool under /usr/bin/time; prints "wall user sys maxrss_kb".
timed() {
    /usr/bin/time -f "%e %U %S %M" -o "$work/time" "$@" >"$work/out" 2>&1 || {
        echo "bench: $1 failed:" >&2
        tail -5 "$work/out" >&2
        return 1
    }
    cat "$work/time"
}

write_configs() {
    cat > "$work/imapull.toml" <<CONF
ledger = "$work/ledger.sqlite3"
[accounts.bench]
host = "localhost"
port = ${LINK_PORT:-$IMAPS_PORT}
ca_file = "$CA_FILE"
username = "$user"
password = "secret"
deliver = "smtp://127.0.0.1:$sink_port"
recipients = ["bench@example.test"]
initial = "all"
compress = ${COMPRESS:-\"auto\"}
CONF
    chmod 600 "$work/imapull.toml"
    # imapull-2s: two delivery sessions instead of the default one;
    # imapull-grouped and imapull-msg: each durability, whatever the default.
    sed 's/^compress = .*/&\ndelivery_sessions = 2/' "$work/imapull.toml" > "$work/imapull-2s.toml"
    sed 's/^compress = .*/&\ndelivery_sessions = 2\nindependent_sessions = true/' \
        "$work/imapull.toml" > "$work/imapull-2si.toml"
    sed 's/^compress = .*/&\ndurability = "grouped"/' "$work/imapull.toml" > "$work/imapull-grouped.toml"
    sed 's/^compress = .*/&\ndurability = "message"/' "$work/imapull.toml" > "$work/imapull-msg.toml"
    # imapull-z and imapull-nz: COMPRESS on every pass, and never.
    sed 's/^compress = .*/compress = true/' "$work/imapull.toml" > "$work/imapull-z.toml"
    sed 's/^compress = .*/compress = false/' "$work/imapull.toml" > "$work/imapull-nz.toml"
    chmod 600 "$work"/imapull-*.toml
    cat > "$work/pullimap.conf" <<CONF
[bench]
type = imaps
host = localhost
port = ${LINK_PORT:-$IMAPS_PORT}
SSL_CAfile = $CA_FILE
username = $user
password = secret
statefile = $work/pullimap.state
deliver-method = smtp:[127.0.0.1]:$sink_port
deliver-rcpt = bench@example.test
compress = ${COMPRESS_PULLIMAP:-NO}
CONF
    cat > "$work/fetchmailrc" <<CONF
set no bouncemail
set no syslog
poll localhost port ${LINK_PORT:-$IMAPS_PORT} protocol IMAP
    user "$user" password "secret" is "bench@example.test" here
    ssl sslcertck sslcertfile "$CA_FILE"
    smtphost 127.0.0.1/$sink_port
    keep fetchall
CONF
    chmod 600 "$work/fetchmailrc"
}

run_tool() {
    case $1 in
        imapull)
            rm -f "$work"/ledger.sqlite3*
            timed "$imapull" --config "$work/imapull.toml" -q run
            ;;
        imapull-2s | imapull-2si | imapull-grouped | imapull-msg | imapull-z | imapull-nz)
            rm -f "$work"/ledger.sqlite3*
            timed "$imapull" --config "$work/$1.toml" -q run
            ;;
        imapull-base)
            # Another build of imapull (IMAPULL_BASE=path), the same config:
            # before and after a change, in one run.
            rm -f "$work"/ledger.sqlite3*
            timed "$IMAPULL_BASE" --config "$work/imapull.toml" -q run
            ;;
        pullimap)
            rm -f "$work/pullimap.state"
            timed pullimap --config="$work/pullimap.conf" --quiet bench
            ;;
        pullimap-nd)
            # PullIMAP with TCP_NODELAY forced on its sockets: its stall
            # removed, to compare pipelines rather than a socket option.
            rm -f "$work/pullimap.state"
            LD_PRELOAD=$nodelay timed pullimap --config="$work/pullimap.conf" --quiet bench
            ;;
        pullimap-nd-z)
            # The same with COMPRESS=DEFLATE.
            rm -f "$work/pullimap.state"
            sed 's/^compress = .*/compress = YES/' "$work/pullimap.conf" > "$work/pullimap-z.conf"
            LD_PRELOAD=$nodelay timed pullimap --config="$work/pullimap-z.conf" --quiet bench
            ;;
        fetchmail)
            rm -f "$work/fetchmail.ids"
            timed fetchmail -f "$work/fetchmailrc" --idfile "$work/fetchmail.ids" -N -s
            ;;
        limit)
            timed "$tools" barefetch localhost "$IMAPS_PORT" "$user" secret "$CA_FILE"
            ;;
        e2e)
            timed "$tools" pipe localhost "$IMAPS_PORT" "$user" secret "$CA_FILE" "127.0.0.1:$sink_port"
            ;;
    esac
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# bench N RUNS MIX TOOLS...
bench() {
    local n=$1 runs=$2 mix=$3
    shift 3
    rm -rf "$work/template"
    "$tools" seed "$work/template" "$n" 42 "$mix" | tee "$work/seed"
    local bytes
    bytes=$(awk '{print $3}' "$work/seed")
    write_configs
    printf '\n%-15s %9s %8s %8s %8s %9s %9s %9s %9s\n' tool msgs/s MB/s wall_s cpu_s rss_MB "x imapull" "x limit" "x e2e"
    declare -A rate
    for tool in limit e2e "$@"; do
        : > "$work/runs"
        for _ in $(seq 1 "$runs"); do
            restore
            local t_wall t_user t_sys t_rss
            read -r t_wall t_user t_sys t_rss < <(run_tool "$tool")
            if [[ $tool != limit ]]; then
                got=$(( $(sink_count) - sink_base ))
                if ((got != n)); then
                    echo "bench: $tool delivered $got of $n messages" >&2
                fi
            fi
            echo "$t_wall $t_user $t_sys $t_rss" >> "$work/runs"
        done
        wall=$(awk '{print $1}' "$work/runs" | median)
        cpu=$(awk '{print $2 + $3}' "$work/runs" | median)
        rss=$(awk '{print $4}' "$work/runs" | median)
        rate[$tool]=$(awk -v n="$n" -v w="$wall" 'BEGIN {printf "%.1f", n / (w > 0 ? w : 0.001)}')
        local mbs
        mbs=$(awk -v b="$bytes" -v w="$wall" 'BEGIN {printf "%.1f", b / 1e6 / (w > 0 ? w : 0.001)}')
        local vs_imapull="-"
        [[ -n ${rate[imapull]:-} ]] && vs_imapull=$(awk -v a="${rate[$tool]}" -v b="${rate[imapull]}" 'BEGIN {printf "%.3f", a / b}')
        local vs_limit
        vs_limit=$(awk -v a="${rate[$tool]}" -v b="${rate[limit]}" 'BEGIN {printf "%.3f", a / b}')
        local vs_e2e="-"
        [[ -n ${rate[e2e]:-} ]] && vs_e2e=$(awk -v a="${rate[$tool]}" -v b="${rate[e2e]}" 'BEGIN {printf "%.3f", a / b}')
        printf '%-15s %9s %8s %8s %8s %9s %9s %9s %9s\n' "$tool" "${rate[$tool]}" "$mbs" "$wall" "$cpu" \
            "$(awk -v k="$rss" 'BEGIN {printf "%.1f", k / 1024}')" "$vs_imapull" "$vs_limit" "$vs_e2e"
    done
}

# The users u0..u19, five small messages each (seeded by their number).
twenty_users() {
    local i
    for i in $(seq 0 19); do
        scripts/testenv.sh adduser "$work" "u$i"
        rm -rf "$work/seed20"
        "$tools" seed "$work/seed20" 5 "$i" small >/dev/null
        rm -rf "$HOMES/u$i/Maildir"
        cp -a "$work/seed20" "$HOMES/u$i/Maildir"
        chown -R nobody:nogroup "$HOMES/u$i"
    done
}

# Twenty accounts on the same server, five small messages each: one run
# that pulls them all, then one with nothing new, with the accounts worked
# on one, eight and twenty (the default) at a time.
accounts() {
    local names=(u{0..19})
    twenty_users
    for par in 1 8 20; do
        {
            echo "ledger = \"$work/accounts-$par.sqlite3\""
            echo "parallel_accounts = $par"
            account_defaults
            echo "initial = \"all\""
            echo "mark_seen = false"
            echo "compress = false"
            for u in "${names[@]}"; do
                printf '[accounts.%s]\nusername = "%s"\n' "$u" "$u"
            done
        } > "$work/accounts-$par.toml"
        chmod 600 "$work/accounts-$par.toml"
        rm -f "$work"/accounts-"$par".sqlite3*
        local base
        base=$(sink_count)
        printf 'parallel_accounts = %s: first run (100 messages): ' "$par"
        /usr/bin/time -f "%e s" "$imapull" --config "$work/accounts-$par.toml" -q run 2>&1 | tail -1
        printf 'parallel_accounts = %s: nothing new:            ' "$par"
        /usr/bin/time -f "%e s" "$imapull" --config "$work/accounts-$par.toml" -q run 2>&1 | tail -1
        echo "  delivered: $(( $(sink_count) - base ))"
        [[ -n ${BENCH_DEBUG:-} ]] && "$imapull" --config "$work/accounts-$par.toml" -v run 2>&1 | tail -45
        # Before and after a change (IMAPULL_BASE): nothing-new runs,
        # interleaved, medians of wall and CPU seconds.
        if [[ -n ${IMAPULL_BASE:-} ]]; then
            local r tool label
            # The other build has a ledger of its own (its schema may be
            # older), brought to the same state by a first run.
            sed "s|accounts-$par.sqlite3|accounts-$par-base.sqlite3|" \
                "$work/accounts-$par.toml" > "$work/accounts-$par-base.toml"
            chmod 600 "$work/accounts-$par-base.toml"
            "$IMAPULL_BASE" --config "$work/accounts-$par-base.toml" -q run
            : > "$work/ab-imapull"; : > "$work/ab-base"
            for r in $(seq 1 11); do
                for tool in imapull base; do
                    local bin=$imapull conf=$work/accounts-$par.toml
                    [[ $tool == base ]] && bin=$IMAPULL_BASE conf=$work/accounts-$par-base.toml
                    /usr/bin/time -f "%e %U %S" -a -o "$work/ab-$tool" "$bin" --config "$conf" -q run
                done
            done
            for label in imapull base; do
                local wall cpu
                wall=$(awk '{print $1}' "$work/ab-$label" | sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}')
                cpu=$(awk '{print $2+$3}' "$work/ab-$label" | sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}')
                printf '  %-8s parallel_accounts = %s, nothing new: %s s wall, %s s CPU (medians of 11, interleaved)\n' \
                    "$label" "$par" "$wall" "$cpu"
            done
        fi
    done
}

# COMPRESS=DEFLATE on and off: bytes on the wire (counted by imapull below
# TLS and DEFLATE) and time, on loopback.
compress() {
    local n=${1:-1000} mix=${2:-realistic}
    rm -rf "$work/template"
    "$tools" seed "$work/template" "$n" 42 "$mix"
    for c in false true; do
        COMPRESS=$c write_configs
        restore
        rm -f "$work"/ledger.sqlite3*
        /usr/bin/time -f "%e s wall, %U+%S s CPU" -o "$work/time" \
            "$imapull" --config "$work/imapull.toml" -v run 2> "$work/log"
        printf 'compress = %-5s  %s  ' "$c" "$(cat "$work/time")"
        grep -o 'bytes_in=[0-9]* bytes_out=[0-9]* compressed=[a-z]*' "$work/log" | tail -1
    done
}

# imapull into real receivers, with one, two and two independent delivery
# sessions (2i: independent_sessions): Postfix
# over SMTP (queue file fsynced before its 250, then virtual delivery to a
# Maildir) and Dovecot over LMTP (the message saved before its 250). The
# time is imapull's run; the count waits for Postfix's queue to drain.
receivers() {
    local n=${1:-1000} runs=${2:-3} target s url rcpt dir got i wall
    rm -rf "$work/template"
    "$tools" seed "$work/template" "$n" 42 realistic
    write_configs
    scripts/testenv.sh adduser "$work" u7
    for target in postfix lmtp; do
        if [[ $target == postfix ]]; then
            url="smtp://127.0.0.1:$SMTP_PORT" rcpt=carol@example.test dir=$VMAIL/carol
        else
            url="lmtp://127.0.0.1:$LMTP_PORT" rcpt=u7@example.test dir=$HOMES/u7/Maildir
        fi
        for s in 1 2 2i; do
            sed -e "s|^deliver = .*|deliver = \"$url\"|" \
                -e "s|^recipients = .*|recipients = [\"$rcpt\"]|" \
                -e "s|^compress = .*|&\ndelivery_sessions = ${s%i}|" \
                "$work/imapull.toml" > "$work/receiver.toml"
            [[ $s == *i ]] && echo 'independent_sessions = true' >> "$work/receiver.toml"
            chmod 600 "$work/receiver.toml"
            : > "$work/runs"
            for _ in $(seq 1 "$runs"); do
                restore
                rm -rf "$dir"
                rm -f "$work"/ledger.sqlite3*
                read -r wall _ < <(timed "$imapull" --config "$work/receiver.toml" -q run)
                got=0
                for i in $(seq 1 1200); do
                    got=$(find "$dir" -path '*/new/*' -type f 2>/dev/null | wc -l)
                    ((got >= n)) && break
                    sleep 0.1
                done
                ((got == n)) || echo "bench: $target received $got of $n messages" >&2
                echo "$wall" >> "$work/runs"
            done
            wall=$(median < "$work/runs")
            printf '%-8s delivery_sessions = %s: %5s s, %7s msgs/s (median of %s)\n' "$target" "$s" \
                "$wall" "$(awk -v n="$n" -v w="$wall" 'BEGIN {printf "%.1f", n / w}')" "$runs"
        done
    done
}

# The [defaults] table of the many-account configs: the test Dovecot's
# users, into smtp-sink.
account_defaults() {
    echo "[defaults]"
    echo "host = \"localhost\""
    if [[ -n ${BENCH_PLAIN:-} ]]; then
        # Plain IMAP on loopback: what TLS costs the daemon.
        echo "port = $IMAP_PORT"
        echo "tls = \"none\""
    else
        echo "port = ${LINK_PORT:-$IMAPS_PORT}"
    fi
    echo "ca_file = \"$CA_FILE\""
    echo "password = \"secret\""
    echo "deliver = \"smtp://127.0.0.1:$sink_port\""
    echo "recipients = [\"bench@example.test\"]"
}

# One daemon on N accounts of one Dovecot that hibernates idle sessions:
# once every mailbox idles, the daemon's RSS, Dovecot's processes, and how
# long SIGTERM takes to end the daemon.
stop_time() {
    local n=$1 conf=$work/stop.toml i pid procs hib rss t0 t1
    DOVECOT_LOG_FILE=$work/dovecot/log
    # Dovecot runs every test user as nobody, and a session without inotify
    # cannot be hibernated: raise the per-user limit for this run only.
    inotify_was=$(cat /proc/sys/fs/inotify/max_user_instances)
    if ((inotify_was < 2 * n + 256)); then
        echo $((2 * n + 256)) > /proc/sys/fs/inotify/max_user_instances
    fi
    {
        echo "ledger = \"$work/stop.sqlite3\""
        account_defaults
        echo "compress = ${COMPRESS:-\"auto\"}"
        for i in $(seq 0 $((n - 1))); do
            printf '[accounts.u%d]\nusername = "u%d"\n' "$i" "$i"
        done
    } > "$conf"
    chmod 600 "$conf"
    for i in $(seq 0 $((n - 1))); do scripts/testenv.sh adduser "$work" "u$i"; done
    # IMAPULL_BASE: another build, for before and after a change.
    local started ready=""
    started=$(date +%s.%N)
    "${IMAPULL_BASE:-$imapull}" --config "$conf" daemon 2> "$work/daemon.log" &
    pid=$!
    # Every account connected and idling, and Dovecot done hibernating.
    for i in $(seq 1 1800); do
        sleep 0.1
        if [[ -z $ready ]] && (($(grep -c 'first pass of this mailbox' "$work/daemon.log") >= n)); then
            ready=$(date +%s.%N)
        fi
        if [[ -n $ready ]] && ((i % 10 == 0)); then
            procs=$(pgrep -c -x imap || true)
            hib=$(pgrep -c -x imap-hibernate || true)
            if ((hib > 0 && procs < 10)); then
                break
            fi
        fi
    done
    sleep 3
    procs=$(pgrep -c -x imap || true)
    hib=$(pgrep -c -x imap-hibernate || true)
    rss=$(ps -o rss= -p "$pid")
    # CPU while idle: the daemon's user and system ticks over 20 s.
    local ticks0 ticks1 hz
    hz=$(getconf CLK_TCK)
    ticks0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    sleep 20
    ticks1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    # Arrival to delivery: ten messages, one at a time, each to a random
    # account, timed from the end of `doveadm save` (the message is in the
    # mailbox) to smtp-sink's count going up.
    rm -rf "$work/one"
    "$tools" seed "$work/one" 1 7 small >/dev/null
    local msg k before t_saved t_got
    msg=$(ls "$work/one/cur/"*)
    : > "$work/arrivals"
    for k in $(seq 1 10); do
        before=$(sink_count)
        doveadm -c "$DOVECOT_CONF" save -u "u$(( RANDOM % n ))" < "$msg"
        t_saved=$(date +%s.%N)
        while (( $(sink_count) <= before )); do sleep 0.002; done
        t_got=$(date +%s.%N)
        awk -v a="$t_saved" -v b="$t_got" 'BEGIN {printf "%.1f\n", (b - a) * 1000}' >> "$work/arrivals"
        sleep 0.5
    done
    t0=$(date +%s.%N)
    kill -TERM "$pid"
    wait "$pid" || echo "bench: the daemon exited $?" >&2
    t1=$(date +%s.%N)
    printf '%d accounts idling: daemon RSS %.1f MB; Dovecot: %d imap, %d imap-hibernate processes\n' \
        "$n" "$(awk -v k="$rss" 'BEGIN {print k / 1024}')" "$procs" "$hib"
    printf 'start to every first pass done: %.1f s\n' "$(awk -v a="$started" -v b="${ready:-$started}" 'BEGIN {print b - a}')"
    printf 'SIGTERM to exit: %.2f s\n' "$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')"
    printf 'CPU while idle: %.2f %% of a core (over 20 s)\n' \
        "$(awk -v a="$ticks0" -v b="$ticks1" -v hz="$hz" 'BEGIN {print (b - a) / hz / 20 * 100}')"
    printf 'arrival to delivery: median %s ms, max %s ms (10 messages, from doveadm save to smtp-sink)\n' \
        "$(sort -n "$work/arrivals" | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}')" \
        "$(sort -n "$work/arrivals" | tail -1)"
    grep -iE 'error|fatal|warning' "$DOVECOT_LOG_FILE" 2>/dev/null | sort | uniq -c | sort -rn | head -5 || true
}

# A slow link (bench-tools shape) between the tools and Dovecot: RTT
# milliseconds, MBIT megabits a second each way. The first pull of N
# messages of the "wan" mix (realistic, text that deflates about as much as
# real mail), with and without COMPRESS; a pass with nothing new, with its
# round trips; twenty accounts with nothing new; the bytes that crossed the
# link, and how full it was kept during each pull.
link() {
    local rtt=$1 mbit=$2 n=$3
    local lport=$(( 20000 + RANDOM % 40000 ))
    "$tools" shape "$lport" "127.0.0.1:$IMAPS_PORT" "$rtt" "$mbit" "$work/link.stats" &
    shape_pid=$!
    sleep 0.3
    export LINK_PORT=$lport
    rm -rf "$work/template"
    "$tools" seed "$work/template" "$n" 42 wan | tee "$work/seed"
    write_configs
    echo
    printf '%-14s %8s %10s %11s %8s %8s\n' tool wall_s down_MB "x bytes/rate" link_use flights
    local tool
    for tool in ${LINK_TOOLS:-imapull imapull-nz pullimap-nd pullimap-nd-z fetchmail}; do
        restore
        : > "$work/link.stats"
        local t_wall t_user t_sys t_rss
        read -r t_wall t_user t_sys t_rss < <(run_tool "$tool")
        sleep $(awk -v r="$rtt" 'BEGIN {print 2 * r / 1000}')
        got=$(( $(sink_count) - sink_base ))
        ((got == n)) || echo "bench: $tool delivered $got of $n messages" >&2
        awk -v w="$t_wall" -v mbit="$mbit" -v t="$tool" '
            {for (i = 1; i <= NF; i++) {split($i, kv, "="); v[kv[1]] += kv[2]}; if ($4 ~ /secs/) {split($4, s, "="); if (s[2] > longest) longest = s[2]}}
            END {
                rate = mbit * 1e6 / 8
                printf "%-14s %8.2f %10.1f %11.2f %7.0f%% %8d\n", t, w, v["down"] / 1e6, w / (v["down"] / rate), 100 * v["down"] / rate / longest, v["flights"]
            }' "$work/link.stats"
    done
    echo
    echo "== a pass with nothing new over the link (imapull; median of 5)"
    restore
    rm -f "$work"/ledger.sqlite3*
    "$imapull" --config "$work/imapull.toml" -q run
    : > "$work/nothing"
    for _ in 1 2 3 4 5; do
        : > "$work/link.stats"
        /usr/bin/time -f "%e" -a -o "$work/nothing" "$imapull" --config "$work/imapull.toml" -q run
        sleep $(awk -v r="$rtt" 'BEGIN {print 2 * r / 1000}')
        cat "$work/link.stats" >> "$work/nothing.stats"
    done
    local wall flights
    wall=$(sort -n "$work/nothing" | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}')
    flights=$(sed -n 's/.*flights=\([0-9]*\).*/\1/p' "$work/nothing.stats" | sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}')
    echo "  $wall s wall ($(awk -v w="$wall" -v r="$rtt" 'BEGIN {printf "%.1f", w * 1000 / r}') RTTs, process start included); the client's flights: $flights, plus TCP's handshake"
    echo
    echo "== twenty accounts with nothing new over the link"
    accounts_over_link
    kill "$shape_pid" 2>/dev/null || true
    shape_pid=
    unset LINK_PORT
}

# Twenty accounts of five messages each, pulled once, then timed with
# nothing new, against one account alone (same link): against Dovecot's
# default login processes (one imap-login process per connection, started
# for it), then again against shared ones (Dovecot's "high-performance
# mode": service_count = 0, two processes kept ready), which spare the
# server most of its CPU per login. Dovecot's own CPU is printed with each:
# on two cores the server's work per login bounds twenty logins at once.
accounts_over_link() {
    local names=(u{0..19})
    twenty_users
    over_link_rows 1 20
    dovecot_login_processes shared
    echo "  -- Dovecot's login processes shared (service_count = 0, process_min_avail = 2):"
    over_link_rows 1 20
    dovecot_login_processes default
}

# Dovecot's imap-login service: "default" (a process per connection) or
# "shared" (processes that serve many connections), applied by a reload.
dovecot_login_processes() {
    local conf=$DOVECOT_CONF
    sed -i '/^  service_count = 0$/d; /^  process_min_avail = 2$/d' "$conf"
    if [[ $1 == shared ]]; then
        sed -i 's/^service imap-login {$/service imap-login {\n  service_count = 0\n  process_min_avail = 2/' "$conf"
    fi
    doveadm -c "$DOVECOT_CONF" reload
    # The old login processes end, the new ones start.
    sleep 1
}

# The CPU seconds Dovecot's processes have used so far (the master's and
# its reaped children's).
dovecot_cpu() {
    awk -v t="$(getconf CLK_TCK)" '{printf "%.2f\n", ($14 + $15 + $16 + $17) / t}' \
        "/proc/$(cat "$work/dovecot/run/master.pid")/stat"
}

over_link_rows() {
    local count
    for count in "$@"; do
        {
            echo "ledger = \"$work/link-$count.sqlite3\""
            account_defaults
            echo "initial = \"all\""
            for u in "${names[@]:0:$count}"; do
                printf '[accounts.%s]\nusername = "%s"\n' "$u" "$u"
            done
        } > "$work/link-$count.toml"
        chmod 600 "$work/link-$count.toml"
        rm -f "$work"/link-"$count".sqlite3*
        "$imapull" --config "$work/link-$count.toml" -q run
        : > "$work/link-$count.times"
        local cpu0 cpu1
        sleep 0.5
        cpu0=$(dovecot_cpu)
        for _ in 1 2 3 4 5; do
            /usr/bin/time -f "%e" -a -o "$work/link-$count.times" "$imapull" --config "$work/link-$count.toml" -q run
        done
        # The sessions' processes end after imapull's LOGOUT.
        sleep 0.5
        cpu1=$(dovecot_cpu)
        echo "  $count account(s), nothing new: $(sort -n "$work/link-$count.times" | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}') s (median of 5); Dovecot's CPU $(awk -v a="$cpu0" -v b="$cpu1" 'BEGIN {printf "%.2f", (b - a) / 5}') s a run"
    done
}

case ${1:-} in
    link)
        echo "== a slow link: ${2:-40} ms round trip, ${3:-50} Mbit/s, ${4:-1000} messages (wan mix)"
        link "${2:-40}" "${3:-50}" "${4:-1000}"
        ;;
    stop)
        echo "== one daemon on ${2:-1000} accounts of a hibernating Dovecot"
        stop_time "${2:-1000}"
        ;;
    compress)
        echo "== COMPRESS=DEFLATE off and on, ${2:-1000} messages (${3:-realistic} mix)"
        compress "${2:-1000}" "${3:-realistic}"
        ;;
    receivers)
        echo "== imapull into Postfix (SMTP) and Dovecot (LMTP), ${2:-1000} messages"
        receivers "${2:-1000}" "${3:-3}"
        ;;
    accounts)
        echo "== 20 accounts, 5 small messages each, over IMAPS on 127.0.0.1"
        accounts
        ;;
    memory)
        echo "== peak RSS: one 50 MB message among 200 small ones"
        bench 201 1 big50 imapull
        echo "== peak RSS: 1,000 small messages"
        bench 1000 1 small imapull
        echo "== peak RSS: 50,000 small messages"
        bench 50000 1 small imapull
        ;;
    *)
        n=${1:-1000}
        runs=${2:-3}
        mix=${3:-realistic}
        echo "== $n messages ($mix mix), median of $runs runs, over IMAPS on 127.0.0.1 into smtp-sink"
        # shellcheck disable=SC2086
        bench "$n" "$runs" "$mix" ${BENCH_TOOLS:-imapull pullimap pullimap-nd fetchmail}
        echo
        echo "== a second imapull run with nothing new (one SELECT, no FETCH, no SMTP connection)"
        restore
        rm -f "$work"/ledger.sqlite3*
        "$imapull" --config "$work/imapull.toml" -q run
        /usr/bin/time -f "%e s wall, %U+%S s CPU" "$imapull" --config "$work/imapull.toml" -q run
        ;;
esac
