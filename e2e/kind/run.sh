#!/usr/bin/env bash
# carve on a real cluster, for machines with docker and kind (test tier 4):
# a kind cluster with no default CNI (1 control plane + 2 workers), the carve
# image built and loaded, CRDs + manifests/ + the overlay pool applied, then:
#   - every Node turns Ready (carve is its CNI),
#   - a pod on each node has an IP inside that node's NodeNetworkConfig block,
#   - the pods ping each other across nodes (VXLAN),
#   - egress is SNAT'd: a listener on the `kind` docker network sees the
#     node's IP, not the pod's.
# Where docker, kind, kubectl or a working docker daemon are missing, it says
# so in one line and exits 0.
#
#   e2e/kind/run.sh                    build, run, delete the cluster
#   KEEP_CLUSTER=1 e2e/kind/run.sh     keep the cluster (and the listener)
#   CARVE_IMAGE=repo/carve:dev         build and use that tag instead
#   SKIP_BUILD=1                       use $CARVE_IMAGE as it is in docker
#   KIND_CLUSTER_NAME=...  KIND_NODE_IMAGE=...  CARVE_TEST_IMAGE=busybox:...  CARVE_WAIT=300s

# --- IPv4 CIDR arithmetic (sourced on its own by e2e/tests/scripts.rs) ---

# The 32-bit value of a dotted-quad IPv4 address; fails on anything else.
ipv4_to_int() {
  [[ $1 =~ ^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$ ]] || return 1
  local a=$((10#${BASH_REMATCH[1]})) b=$((10#${BASH_REMATCH[2]})) c=$((10#${BASH_REMATCH[3]})) d=$((10#${BASH_REMATCH[4]}))
  ((a <= 255 && b <= 255 && c <= 255 && d <= 255)) || return 1
  echo $(((a << 24) | (b << 16) | (c << 8) | d))
}

# ipv4_in_cidr IP CIDR: true when IP lies inside CIDR (both IPv4).
ipv4_in_cidr() {
  [[ $2 =~ ^([0-9.]+)/([0-9]{1,2})$ ]] || return 1
  local net_ip=${BASH_REMATCH[1]} len=$((10#${BASH_REMATCH[2]})) ip net mask
  ((len <= 32)) || return 1
  ip=$(ipv4_to_int "$1") || return 1
  net=$(ipv4_to_int "$net_ip") || return 1
  mask=$((len == 0 ? 0 : (0xFFFFFFFF << (32 - len)) & 0xFFFFFFFF))
  (((ip & mask) == (net & mask)))
}

if [[ ${BASH_SOURCE[0]} != "$0" ]]; then
  return 0
fi

set -euo pipefail

# --- skip where the tools are missing (bash builtins only until here) ---
missing=()
for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
  list=$(printf '%s, ' "${missing[@]}")
  echo "e2e/kind/run.sh: ${list%, } not found in PATH; the kind e2e is skipped"
  exit 0
fi
if ! docker info >/dev/null 2>&1; then
  echo "e2e/kind/run.sh: no working docker daemon (docker info failed); the kind e2e is skipped"
  exit 0
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEFAULT_IMAGE=ghcr.io/carve-dev/carve:v0.1.0
IMAGE="${CARVE_IMAGE:-$DEFAULT_IMAGE}"
CLUSTER="${KIND_CLUSTER_NAME:-carve-e2e}"
TEST_IMAGE="${CARVE_TEST_IMAGE:-busybox:1.36}"
WAIT="${CARVE_WAIT:-300s}"
LISTENER="$CLUSTER-egress-listener"
NS=carve-e2e
work="$root/target/kind"
export KUBECONFIG="$work/kubeconfig"

log() { echo "==> $*"; }
ok() { echo "ok: $*"; }
fail() {
  echo "FAIL: $*" >&2
  exit 1
}

diagnostics() {
  echo "--- diagnostics ---"
  kubectl get nodes -o wide
  kubectl get podcidrs,nodenetworkconfigs -o wide
  kubectl get pods -A -o wide
  local pod
  for pod in $(kubectl -n carve-system get pods -o name); do
    echo "--- $pod ---"
    kubectl -n carve-system logs "$pod" --all-containers --tail=40
  done
}

created=0
cleanup() {
  local rc=$?
  trap - EXIT
  if ((created)); then
    if ((rc != 0)); then
      diagnostics || true
    fi
    if [[ ${KEEP_CLUSTER:-0} == 1 ]]; then
      log "kept cluster $CLUSTER and container $LISTENER: export KUBECONFIG=$KUBECONFIG"
      log "remove them with: kind delete cluster --name $CLUSTER; docker rm -f $LISTENER"
    else
      docker rm -f "$LISTENER" >/dev/null 2>&1 || true
      kind delete cluster --name "$CLUSTER" --kubeconfig "$KUBECONFIG" >/dev/null 2>&1 || true
    fi
  fi
  if ((rc == 0)); then
    echo "kind e2e passed"
  else
    echo "kind e2e failed (exit $rc)" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  fail "a kind cluster named $CLUSTER exists already: delete it (kind delete cluster --name $CLUSTER) or set KIND_CLUSTER_NAME"
fi
mkdir -p "$work"

# --- image ---
if [[ ${SKIP_BUILD:-0} == 1 ]]; then
  docker image inspect "$IMAGE" >/dev/null 2>&1 || fail "SKIP_BUILD=1 but there is no image $IMAGE in docker"
else
  log "building $IMAGE"
  docker build -t "$IMAGE" "$root"
fi

# --- cluster ---
log "creating kind cluster $CLUSTER (1 control plane + 2 workers, no default CNI)"
create=(create cluster --name "$CLUSTER" --config "$root/e2e/kind/kind-config.yaml" --kubeconfig "$KUBECONFIG")
if [[ -n ${KIND_NODE_IMAGE:-} ]]; then
  create+=(--image "$KIND_NODE_IMAGE")
fi
created=1
kind "${create[@]}"
kind load docker-image "$IMAGE" --name "$CLUSTER"

# --- carve ---
log "installing carve"
kubectl apply -f "$root/crds/"
kubectl wait --for=condition=Established --timeout=60s crd/podcidrs.carve.dev crd/nodenetworkconfigs.carve.dev
kubectl apply -f "$root/examples/overlay.yaml"
compgen -G "$root/manifests/*.yaml" >/dev/null || fail "manifests/ holds no *.yaml: nothing deploys carve"
kubectl create namespace carve-system --dry-run=client -o yaml | kubectl apply -f -
kubectl apply -f "$root/manifests/"
if [[ $IMAGE != "$DEFAULT_IMAGE" ]]; then
  kubectl -n carve-system set image deploy/carve-controller "controller=$IMAGE"
  kubectl -n carve-system set image ds/carve-agent "agent=$IMAGE" "install-cni=$IMAGE"
fi
kubectl -n carve-system rollout status deploy/carve-controller --timeout="$WAIT"
kubectl -n carve-system rollout status ds/carve-agent --timeout="$WAIT"
kubectl wait --for=condition=Ready node --all --timeout="$WAIT"
ok "every node is Ready with carve as its CNI"

# --- one pod per node ---
nodes=()
while read -r n; do
  [[ -n $n ]] && nodes+=("$n")
done < <(kubectl get nodes -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
((${#nodes[@]} == 3)) || fail "expected 3 nodes, found ${#nodes[@]}: ${nodes[*]}"

kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f -
for n in "${nodes[@]}"; do
  kubectl apply -f - <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: probe-$n
  namespace: $NS
  labels:
    app: carve-e2e-probe
spec:
  nodeName: $n
  tolerations:
    - operator: Exists
  terminationGracePeriodSeconds: 1
  containers:
    - name: probe
      image: $TEST_IMAGE
      command: ["sleep", "3600"]
EOF
done
kubectl -n "$NS" wait --for=condition=Ready pod -l app=carve-e2e-probe --timeout="$WAIT"

# --- pod IPs inside their node's block ---
pod_ips=()
for n in "${nodes[@]}"; do
  ip=$(kubectl -n "$NS" get pod "probe-$n" -o jsonpath='{.status.podIP}')
  read -r -a blocks <<<"$(kubectl get nnc "$n" -o jsonpath='{.status.blocks[*].cidr}')"
  ((${#blocks[@]})) || fail "NodeNetworkConfig $n has no blocks in its status"
  inside=0
  for b in "${blocks[@]}"; do
    if ipv4_in_cidr "$ip" "$b"; then inside=1; fi
  done
  ((inside)) || fail "pod probe-$n has IP '$ip', outside its node's blocks ${blocks[*]}"
  ok "pod on $n has $ip, inside its block ${blocks[*]}"
  pod_ips+=("$ip")
done

# --- pod to pod across nodes ---
for i in "${!nodes[@]}"; do
  for j in "${!nodes[@]}"; do
    ((i != j)) || continue
    kubectl -n "$NS" exec "probe-${nodes[i]}" -- ping -c 2 -W 3 "${pod_ips[j]}" >/dev/null ||
      fail "pod on ${nodes[i]} cannot ping the pod on ${nodes[j]} (${pod_ips[j]})"
    ok "${nodes[i]} -> ${nodes[j]}: ping ${pod_ips[j]}"
  done
done

# --- egress SNAT: a listener outside the cluster answers with the source it sees ---
mkdir -p "$work/www/cgi-bin"
cat >"$work/www/cgi-bin/peer" <<'EOF'
#!/bin/sh
# Answers with the address the request came from.
echo "Content-Type: text/plain"
echo
echo "$REMOTE_ADDR"
EOF
chmod 0755 "$work/www/cgi-bin/peer"
docker rm -f "$LISTENER" >/dev/null 2>&1 || true
docker create --name "$LISTENER" --network kind "$TEST_IMAGE" httpd -f -v -p 0.0.0.0:8080 -h /www >/dev/null
docker cp "$work/www" "$LISTENER:/www"
docker start "$LISTENER" >/dev/null
listener_ip=$(docker inspect -f '{{with index .NetworkSettings.Networks "kind"}}{{.IPAddress}}{{end}}' "$LISTENER")
[[ -n $listener_ip ]] || fail "container $LISTENER has no IPv4 address on the kind network"

for i in "${!nodes[@]}"; do
  n=${nodes[i]}
  node_ip=$(kubectl get node "$n" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')
  seen=""
  for _ in 1 2 3 4 5; do
    seen=$(kubectl -n "$NS" exec "probe-$n" -- timeout 20 wget -q -O - "http://$listener_ip:8080/cgi-bin/peer" 2>/dev/null |
      tr -d '[:space:]') && [[ -n $seen ]] && break
    sleep 2
  done
  [[ -n $seen ]] || fail "pod on $n cannot reach $listener_ip:8080 on the kind network (egress)"
  seen=${seen#\[}
  seen=${seen%\]}
  seen=${seen#::ffff:}
  [[ $seen != "${pod_ips[i]}" ]] || fail "egress from the pod on $n is not SNAT'd: the listener sees the pod IP $seen"
  [[ " $node_ip " == *" $seen "* ]] ||
    fail "egress from the pod on $n arrives from $seen, expected the node's IP $node_ip"
  ok "egress from the pod on $n (${pod_ips[i]}) arrives from the node IP $seen"
done
