#!/bin/sh
# PID 1 of DOVE's test guest: KUnit results, then the noisy-neighbour scenario with DOVE
# off and on. Everything the host harness reads is printed as "DOVE-VM ..." lines.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
mkdir -p /sys/fs/cgroup /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
echo "+cpu +cpuset +pids" > /sys/fs/cgroup/cgroup.subtree_control
/usr/sbin/ip link set lo up
say() { echo "DOVE-VM $*"; }
finish() { say END; sync; poweroff -f; }

# CPU 0 is where A and B compete; everything else keeps house on CPU 1, as on a host
# with a housekeeping CPU: this script (so doved, the runtimes and the measurements),
# every kernel thread that may move (per-CPU ones refuse, which is fine), unbound
# workqueues, and device interrupts (irqaffinity=1 on the command line).
# Each scenario calls this before it starts anything, so late kernel threads move too.
housekeep() { for task in /proc/[0-9]*; do taskset -p -c 1 "${task##*/}" >/dev/null 2>&1; done; }
echo 2 > /sys/devices/virtual/workqueue/cpumask
# Per-CPU vm statistics folding every 120 s instead of every second.
echo 120 > /proc/sys/vm/stat_interval
say BOOTED "$(uname -r)" irq_time_accounting=$([ -e /proc/pressure/irq ] && echo yes || echo no) \
    clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)

# KUnit (built in: the suite ran during boot).
dmesg | grep -E "(not ok|ok) [0-9]+ (dove_|sched_dove)" | sed 's/^\[[^]]*\] *//' | while read -r line; do
    say KUNIT "$line"
done

# Hand out CFS bandwidth in 1 ms slices instead of 5 ms: with a 20 ms quota (less what
# DOVE charges) the default slice loses a slice's worth of runtime in most periods.
echo 1000 > /proc/sys/kernel/sched_cfs_bandwidth_slice_us

WINDOW=16
# B is busy (it uses its whole quota on its own) and receives a stream: whatever the
# kernel spends on that stream in softirq is time B gets beyond its quota.
QUOTA=20000
PERIOD=100000

bundle() { # bundle NAME CGROUP CPU_JSON ARGS_JSON
    d=/tmp/bundle-$1
    mkdir -p "$d"
    cat > "$d/config.json" <<EOF
{
  "ociVersion": "1.0.2",
  "process": {"terminal": false, "user": {"uid": 0, "gid": 0}, "args": $4,
              "env": ["PATH=/bin"], "cwd": "/"},
  "root": {"path": "/ctr", "readonly": true},
  "hostname": "$1",
  "mounts": [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
    {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"}
  ],
  "hooks": {
    "createRuntime": [{"path": "/bin/dove-hook", "args": ["dove-hook", "createRuntime"]}],
    "prestart": [{"path": "/bin/dove-hook", "args": ["dove-hook", "prestart"]}],
    "poststop": [{"path": "/bin/dove-hook", "args": ["dove-hook", "poststop"]}]
  },
  "linux": {
    "cgroupsPath": "$2",
    "resources": {"cpu": $3},
    "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}]
  }
}
EOF
    echo "$d"
}

thread_times() { # TID NS COMM for every thread, without a process per thread
    for task in /proc/[0-9]*/task/[0-9]*; do
        read -r ns _ 2>/dev/null < "$task/schedstat" || continue
        comm=?
        read -r comm 2>/dev/null < "$task/comm"
        echo "${task##*/} $ns $comm"
    done
}
busiest_threads() { # busiest_threads BEFORE AFTER: the 8 threads that ran most in between
    awk 'NR == FNR {before[$1] = $2; next} {d = $2 - before[$1]; if (d > 20000000) printf "%d %s/%s=%dms\n", d / 1000000, $3, $1, d / 1000000}' "$1" "$2" |
        sort -rn | head -n 8 | awk '{printf "%s ", $2}'
}
uptime_us() { awk '{printf "%d", $1 * 1000000}' /proc/uptime; }
stat_of() { awk -v k="$2" '$1 == k {print $2}' "/sys/fs/cgroup/$1/cpu.stat"; }
cpu0_softirq_us() { awk '$1 == "cpu0" {print $8 * 10000}' /proc/stat; }
cpu0_irq_us() { awk '$1 == "cpu0" {print $7 * 10000}' /proc/stat; }
cpu0_times() { awk '$1 == "cpu0" {printf "user=%d system=%d idle=%d iowait=%d irq=%d softirq=%d", $2*10, $4*10, $5*10, $6*10, $7*10, $8*10}' /proc/stat; }
unattributed_us() {
    dovectl stats --json | awk '/"unattributed"/ {found = 1} found && /"total_ns"/ {gsub(/[^0-9]/, ""); print int($0 / 1000); exit}'
}
softirq_counts() { # CPU 0's NET_RX TIMER SCHED RCU counts
    awk '$1 ~ /^(NET_RX|TIMER|SCHED|RCU|NET_TX):$/ {printf "%s=%s ", $1, $2}' /proc/softirqs
}
pending_us() { # B's cost not yet taken by the scheduler
    dovectl stats --json | awk '/"id": "dove-b"/ {found = 1} found && /"pending_ns"/ {gsub(/[^0-9]/, ""); print int($0 / 1000); exit}'
}
attributed_us() { # B's attributed softirq time from dovectl stats --json
    dovectl stats --json | awk '/"id": "dove-b"/ {found = 1} found && /"total_ns"/ {gsub(/[^0-9]/, ""); print int($0 / 1000); exit}'
}

scenario() { # scenario off|on
    mode=$1
    enforcement=none
    [ "$mode" = on ] && enforcement=kernel
    cat > /tmp/doved-$mode.toml <<EOF
[daemon]
state_dir = "/tmp/dove-state-$mode"
[observer]
pin_dir = "/sys/fs/bpf/dove-$mode"
[metrics]
listen = ""
[enforcement]
mode = "$enforcement"
EOF
    housekeep # before the containers exist: they must stay on CPU 0
    doved --config /tmp/doved-$mode.toml > /tmp/doved-$mode.log 2>&1 &
    doved_pid=$!
    for _ in $(seq 100); do dovectl status >/dev/null 2>&1 && break; sleep 0.1; done
    say STATUS mode=$mode "$(dovectl status | grep -E 'enforcement|observer' | tr '\n' ' ')"

    /usr/sbin/ip netns add peer
    /usr/sbin/ip link add veth0 type veth peer name veth1
    /usr/sbin/ip link set veth1 netns peer
    /usr/sbin/ip addr add 10.0.0.1/24 dev veth0
    /usr/sbin/ip link set veth0 up
    /usr/sbin/ip -n peer addr add 10.0.0.2/24 dev veth1
    /usr/sbin/ip -n peer link set veth1 up
    /usr/sbin/ip -n peer link set lo up
    # Receive processing for B's traffic on CPU 0, where A and B run; the sender's (its
    # ACKs) on CPU 1 with the sender, as if the peer were another host.
    echo 1 > /sys/class/net/veth0/queues/rx-0/rps_cpus
    /usr/sbin/ip netns exec peer sh -c 'echo 2 > /sys/class/net/veth1/queues/rx-0/rps_cpus'
    # No segmentation offload on the sender's side: B's segments cross veth one by one,
    # as from a real NIC without LRO, so the per-packet kernel work is real.
    /usr/sbin/ip netns exec peer ethtool -K veth1 tso off gso off > /dev/null

    a=$(bundle dove-a /dove-a '{"cpus": "0"}' '["sh", "-c", "while :; do :; done"]')
    b=$(bundle dove-b /dove-b "{\"cpus\": \"0\", \"quota\": $QUOTA, \"period\": $PERIOD}" '["sh", "-c", "while :; do :; done & exec iperf3 -s -1 -p 5201"]')
    runc --root /run/runc create --no-pivot --bundle "$b" dove-b > /tmp/runc-b.log 2>&1 || say ERROR "runc create B: $(cat /tmp/runc-b.log)"
    runc --root /run/runc start dove-b
    runc --root /run/runc create --no-pivot --bundle "$a" dove-a > /tmp/runc-a.log 2>&1 || say ERROR "runc create A: $(cat /tmp/runc-a.log)"
    runc --root /run/runc start dove-a
    sleep 1
    say REGISTERED mode=$mode "$(dovectl list | tail -n +2 | awk '{print $1}' | tr '\n' ' ')"

    # A bounded stream: enough that B's softirq cost is a good part of its quota,
    # not so much that it exceeds it (then no quota can hold B; that is early drop's job).
    /usr/sbin/ip netns exec peer taskset -c 1 iperf3 -c 10.0.0.1 -p 5201 -b ${RATE:-45M} -t $((WINDOW + 4)) > /tmp/iperf-$mode.log 2>&1 &
    sender=$!
    sleep 2
    n0=$(stat_of dove-b nr_periods) t0=$(uptime_us) b0=$(stat_of dove-b usage_usec) a0=$(stat_of dove-a usage_usec) s0=$(cpu0_softirq_us)
    i0=$(cpu0_irq_us)
    d0=$(attributed_us) c0=$(stat_of dove-b dove_charged_usec) u0=$(unattributed_us) p0=$(pending_us)
    say SOFTIRQS-BEFORE mode=$mode "$(softirq_counts)" "$(cpu0_times)"
    thread_times > /tmp/threads-before
    sleep $WINDOW
    thread_times > /tmp/threads-after
    n1=$(stat_of dove-b nr_periods) t1=$(uptime_us) b1=$(stat_of dove-b usage_usec) a1=$(stat_of dove-a usage_usec) s1=$(cpu0_softirq_us)
    i1=$(cpu0_irq_us)
    d1=$(attributed_us) c1=$(stat_of dove-b dove_charged_usec) u1=$(unattributed_us) p1=$(pending_us)
    say SOFTIRQS-AFTER mode=$mode "$(softirq_counts)" "$(cpu0_times)"
    say THREADS mode=$mode "$(busiest_threads /tmp/threads-before /tmp/threads-after)"
    wait $sender
    # The window as the guest's clock measured it, not as asked of sleep; B's quota for it
    # is what CFS granted: one quota per bandwidth period that elapsed (under emulation
    # the period timer runs late, so there are fewer periods than window / 100 ms).
    window=$((t1 - t0))
    say RESULT mode=$mode window_us=$window quota_us=$(((n1 - n0) * QUOTA)) periods=$((n1 - n0)) \
        b_usage_us=$((b1 - b0)) b_softirq_us=$((${d1:-0} - ${d0:-0})) b_charged_us=$((${c1:-0} - ${c0:-0})) b_pending_us=$((${p1:-0} - ${p0:-0})) \
        a_usage_us=$((a1 - a0)) cpu0_softirq_us=$((s1 - s0)) cpu0_irq_us=$((i1 - i0)) unattributed_us=$((${u1:-0} - ${u0:-0})) \
        throughput="$(grep -E 'receiver' /tmp/iperf-$mode.log | awk '{print $7 $8}')"

    runc --root /run/runc kill dove-a KILL
    runc --root /run/runc kill dove-b KILL 2>/dev/null
    sleep 0.5
    runc --root /run/runc delete -f dove-a
    runc --root /run/runc delete -f dove-b
    kill $doved_pid
    wait $doved_pid
    /usr/sbin/ip netns del peer
    sleep 0.5
}

scenario off
scenario on
say DMESG-WARNINGS "$(dmesg | grep -cE 'BUG:|WARNING:|possible recursive locking|circular locking|sleeping function called from invalid context')"
dmesg | grep -E 'BUG:|WARNING:|possible recursive locking|circular locking|sleeping function' | head -5 | while read -r l; do say DMESG "$l"; done
finish
