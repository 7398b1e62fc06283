#!/usr/bin/env bash
# One real node of the local cluster, as the harness (e2e/src/cluster.rs) runs it.
#
#   node.sh init DIR CGROUP [cilium]
#                                run inside a fresh mount namespace and the node's
#                                network namespace: give the node its own /sys,
#                                /etc (an overlay of the host's), /opt, /run,
#                                /var/lib and /var/log, join its cgroup, then hold
#                                the namespaces open until killed. With `cilium`
#                                also what Cilium's agent needs of a node (below).
#   node.sh exec CGROUP CMD...   join the node's cgroup and exec CMD (the harness
#                                runs containerd, kubelet and kube-proxy this way,
#                                entered into the holder's namespaces with nsenter).
#
# Every path a kubelet or containerd writes (/var/lib/kubelet, /run/containerd,
# /var/lib/cni, /var/log/pods, /opt/cni/bin, /etc/cni/net.d, ...) then lands in
# DIR, and nothing on the host changes. Processes live in CGROUP/node in every
# cgroup v1 hierarchy; kubelet puts pods under CGROUP/kubepods, so the harness
# finds every process of a node (containerd shims re-parent) through CGROUP.
set -euo pipefail

join_cgroup() {
  local cg=$1 h
  for h in /sys/fs/cgroup/*/; do
    [[ $h == */unified/ ]] && continue
    echo $$ > "$h$cg/node/cgroup.procs"
  done
}

case ${1:-} in
init)
  dir=${2:?node dir}; cg=${3:?cgroup name}
  # `ip netns exec` would remount /sys and hide the cgroup mounts: mount a
  # sysfs of this network namespace and put the host's cgroup tree back on it.
  mkdir -p "$dir/host-cgroup"
  mount --rbind /sys/fs/cgroup "$dir/host-cgroup"
  mount -t sysfs sysfs /sys
  mount --rbind "$dir/host-cgroup" /sys/fs/cgroup
  umount -l "$dir/host-cgroup"
  mkdir -p "$dir/etc-upper" "$dir/etc-work" "$dir/opt" "$dir/var-lib" "$dir/var-log"
  mount -t overlay overlay -o "lowerdir=/etc,upperdir=$dir/etc-upper,workdir=$dir/etc-work" /etc
  mount --bind "$dir/opt" /opt
  mount --bind "$dir/var-lib" /var/lib
  mount --bind "$dir/var-log" /var/log
  # The host's /run/netns (private, holding every node's namespace) would
  # shadow the node's own: drop it from this mount namespace first.
  if mountpoint -q /run/netns; then umount -l /run/netns; fi
  mount -t tmpfs -o mode=755 tmpfs /run
  # hostPath volumes with HostToContainer propagation need shared mounts.
  for m in /opt /var/lib /var/log /run; do mount --make-rshared "$m"; done
  mkdir -p /etc/cni/net.d /opt/cni/bin /run/netns
  if [[ ${4:-} == cilium ]]; then
    # A BPF filesystem of the node's own (its pinned maps), a cgroup2 subtree
    # of its own at /run/cilium/cgroupv2 (every node shares this machine's
    # hierarchy), and the two machine-wide sysctls the agent sets
    # (kernel.unprivileged_bpf_disabled, kernel.timer_migration) on files of
    # the node's, so the host keeps its values.
    mount -t bpf bpf /sys/fs/bpf
    # The chart's /var/run/netns (a symlink into /run here) and its other
    # HostToContainer volumes need the mounts they sit on shared: within this
    # mount namespace only (it was made private from the host's).
    mount --make-rshared /
    # The chart mounts /lib/modules; a machine without loadable modules may
    # have none (an empty directory is what such a node would show).
    mkdir -p /lib/modules
    mount --make-shared /sys/fs/bpf
    mkdir -p "/sys/fs/cgroup/unified/$cg" /run/cilium/cgroupv2 "$dir/sysctl"
    mount --bind "/sys/fs/cgroup/unified/$cg" /run/cilium/cgroupv2
    for k in unprivileged_bpf_disabled timer_migration; do
      cat "/proc/sys/kernel/$k" > "$dir/sysctl/$k"
      mount --bind "$dir/sysctl/$k" "/proc/sys/kernel/$k"
    done
  fi
  join_cgroup "$cg"
  touch "$dir/ready"
  exec sleep infinity
  ;;
exec)
  cg=${2:?cgroup name}; shift 2
  join_cgroup "$cg"
  exec "$@"
  ;;
*)
  echo "usage: node.sh init DIR CGROUP [cilium] | node.sh exec CGROUP CMD..." >&2
  exit 2
  ;;
esac
