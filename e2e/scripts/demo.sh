#!/usr/bin/env bash
# make demo, after `make cluster-up NODES=3`: deploy carve as a user does,
# run six pods over the three nodes and show the picture. With `cilium`
# (make demo DATAPLANE=cilium) cluster-up already brought carve up ipam-only
# under Cilium; the demo shows what the seed's checks print.
#
#   demo.sh KUBECTL KUBECONFIG [cilium]
set -euo pipefail
kubectl_bin=${1:?kubectl path}
export KUBECONFIG=${2:?kubeconfig path}
dataplane=${3:-carve}
k() { "$kubectl_bin" "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

nodes=$(k get nodes -o name | wc -l)
if ((nodes < 2)); then
  echo "demo: the running cluster has $nodes node(s); stop it with 'make cluster-down' and run 'make demo' again" >&2
  exit 1
fi

if [[ $dataplane == cilium ]]; then
  step "carve (ipam-only) and Cilium, as make cluster-up DATAPLANE=cilium deployed them"
  k -n carve-system get pods -o wide
  k wait --for=condition=Ready node --all --timeout=180s
else
  step "Before carve: nodes NotReady (no CNI network)"
  k get nodes -o wide

  step "kubectl apply -f crds/ && kubectl apply -f manifests/ && kubectl apply -f examples/overlay.yaml"
  k apply -f crds/
  k wait --for=condition=Established --timeout=60s crd/podcidrs.carve.dev crd/nodenetworkconfigs.carve.dev
  k apply -f manifests/
  k apply -f examples/overlay.yaml
  k -n carve-system rollout status daemonset/carve-agent --timeout=180s
  k -n carve-system rollout status deployment/carve-controller --timeout=180s
  k wait --for=condition=Ready node --all --timeout=180s
fi

step "Six pods spread over the nodes"
k apply -f - <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata:
  name: demo
  namespace: default
spec:
  replicas: 6
  selector:
    matchLabels: {app: demo}
  template:
    metadata:
      labels: {app: demo}
    spec:
      terminationGracePeriodSeconds: 1
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: DoNotSchedule
          labelSelector:
            matchLabels: {app: demo}
      containers:
        - name: busybox
          image: carve.local/busybox:v1
          imagePullPolicy: Never
          command: ["sleep", "86400"]
YAML
k rollout status deployment/demo --timeout=180s

step "kubectl get nodes -o wide"
k get nodes -o wide
step "kubectl get pods -o wide"
k get pods -l app=demo -o wide
step "kubectl get nnc"
k get nnc
step "Node podCIDRs"
k get nodes -o custom-columns=NODE:.metadata.name,INTERNAL-IP:'.status.addresses[?(@.type=="InternalIP")].address',POD-CIDR:.spec.podCIDR
step "kubectl -n carve-system get pods -o wide"
k -n carve-system get pods -o wide

# A pod on the first node pings a pod on another node (VXLAN between them).
mapfile -t pods < <(k get pods -l app=demo -o jsonpath='{range .items[*]}{.metadata.name} {.spec.nodeName} {.status.podIP}{"\n"}{end}' | sort -k2)
read -r from from_node _ <<<"${pods[0]}"
for line in "${pods[@]}"; do
  read -r _ node ip <<<"$line"
  if [[ $node != "$from_node" ]]; then to_node=$node; to_ip=$ip; break; fi
done
step "ping from $from ($from_node) to $to_ip ($to_node)"
k exec "$from" -- ping -c 3 -W 2 "$to_ip"

if [[ $dataplane == cilium ]]; then
  step "kubectl get pods -n kube-system -l k8s-app=cilium"
  k get pods -n kube-system -l k8s-app=cilium -o wide
  step "kubectl get pods -n kube-system -l component=kube-proxy (none: Cilium replaces it)"
  k get pods -n kube-system -l component=kube-proxy
  step "a ClusterIP Service reached from $from (Cilium's kube-proxy replacement)"
  k apply -f - <<'YAML'
apiVersion: v1
kind: Pod
metadata: {name: demo-web, namespace: default, labels: {app: demo-web}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: web
      image: carve.local/busybox:v1
      imagePullPolicy: Never
      command: ["sh", "-c", "while true; do hostname | nc -l -p 8080; done"]
---
apiVersion: v1
kind: Service
metadata: {name: demo-web, namespace: default}
spec:
  selector: {app: demo-web}
  ports: [{port: 80, targetPort: 8080, protocol: TCP}]
YAML
  k wait --for=condition=Ready pod/demo-web --timeout=120s
  ip=$(k get service demo-web -o jsonpath='{.spec.clusterIP}')
  k exec "$from" -- sh -c "nc -w 3 $ip 80 </dev/null"
fi

cat <<EOF

The cluster keeps running:
  export KUBECONFIG=$(realpath "$KUBECONFIG")
  kubectl get pods -o wide        (kubectl: $kubectl_bin)
  make cluster-down               stops it and removes everything it made
EOF
